//! The shipped Grafana dashboard and Prometheus alerts (`dist/grafana`, `dist/prometheus`),
//! proven with the real thing: `promtool` checks the rules and runs their unit tests, every
//! metric they name is one the daemon serves, and a real Prometheus scraping a live daemon in a
//! namespace, after traffic, a cut-over and a canary, returns series for every query of the
//! dashboard (through its HTTP API).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddrV4, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::{
    net::{Server, Topology, VIP, tcp_request, udp_request, wait_for},
    proc::{Daemon, demo_config},
};

const WEB: SocketAddrV4 = SocketAddrV4::new(VIP, 80);
const DNS: SocketAddrV4 = SocketAddrV4::new(VIP, 53);
/// Prometheus's port, inside the test's load-balancer namespace (its own loopback).
const PROMETHEUS_PORT: u16 = 9090;

fn dist() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root").join("dist")
}

fn have(tool: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success())
}

/// The alert names of the rules file.
fn alerts(rules: &str) -> Vec<String> {
    rules.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")).map(|a| a.trim().to_owned()).collect()
}

/// Every PromQL expression of the dashboard: panels' targets and annotations.
fn dashboard_queries() -> Vec<String> {
    let path = dist().join("grafana/switcher.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let json: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut out = Vec::new();
    for panel in json["panels"].as_array().expect("panels") {
        for t in panel["targets"].as_array().into_iter().flatten() {
            out.push(t["expr"].as_str().expect("a target's expr").to_owned());
        }
    }
    for a in json["annotations"]["list"].as_array().expect("annotations") {
        if let Some(e) = a["expr"].as_str() {
            out.push(e.to_owned());
        }
    }
    out
}

/// The names `switcher_…` in a text (PromQL, YAML).
fn metric_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("switcher_") {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        // `switcher_…` inside a word (a label value such as `switcher-alerts`) is not a name.
        let preceded = rest[..i].chars().next_back().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        if !preceded {
            names.push(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names.sort();
    names.dedup();
    names
}

#[test]
fn the_alert_rules_pass_promtool_and_every_alert_has_a_unit_test() {
    const NAME: &str = "the_alert_rules_pass_promtool_and_every_alert_has_a_unit_test";
    if !have("promtool") {
        crate::skip(NAME, "promtool is not installed (apt install prometheus; ./x installs it when run as root)");
        return;
    }
    let dir = dist().join("prometheus");
    let run = |args: &[&str]| {
        let out = Command::new("promtool").current_dir(&dir).args(args).output().expect("run promtool");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
        text
    };
    let checked = run(&["check", "rules", "switcher-alerts.yml"]);
    let rules = std::fs::read_to_string(dir.join("switcher-alerts.yml")).expect("the rules");
    let names = alerts(&rules);
    assert!(checked.contains(&format!("{} rules found", names.len())), "{checked}");
    run(&["test", "rules", "switcher-alerts.test.yml"]);
    // Every alert is unit-tested, firing at least once.
    let tests = std::fs::read_to_string(dir.join("switcher-alerts.test.yml")).expect("the rule tests");
    for alert in &names {
        let firing = tests.split("alertname: ").skip(1).any(|case| {
            case.starts_with(&format!("{alert}\n"))
                && case.lines().nth(1).is_some_and(|l| !l.contains("exp_alerts: []"))
        });
        assert!(firing, "no test in switcher-alerts.test.yml shows {alert} firing");
    }
    assert_eq!(names.len(), 8, "the rules: {names:?}");
}

#[test]
fn every_metric_the_dashboard_and_alerts_use_is_served() {
    use switcher_common::user::Colour;
    use switcher_user::protocol::{
        BackendStatus, ColourStatus, Counters, FleetService, FleetView, FlowTable, Health, Mode, Protocol, Response,
        ServiceStatus, SwitchKinds,
    };
    // A status with everything the daemon can report: a service, a drain, a fleet, flows.
    let status = Response {
        ok: true,
        services: vec![ServiceStatus {
            name: "web".into(),
            vip: "203.0.113.10".into(),
            port: 80,
            preview_port: None,
            protocol: Protocol::Tcp,
            mode: Mode::Nat,
            active: Colour::Green,
            canary: None,
            previous: None,
            switches: 0,
            switch_kinds: SwitchKinds::default(),
            since_switch_secs: Some(1),
            watch_secs_left: None,
            drain: None,
            rollout: None,
            backup: None,
            shadow: None,
            colours: Colour::ALL
                .into_iter()
                .map(|c| ColourStatus {
                    colour: c,
                    healthy: true,
                    backends: vec![BackendStatus {
                        address: "198.51.100.2:8080".into(),
                        weight: 1,
                        health: Health::Up,
                        detail: None,
                    }],
                    live_flows: 0,
                    closing_flows: 0,
                    counters: Counters::default(),
                    edited: false,
                })
                .collect(),
        }],
        reasons: vec![("fwd_redirect".into(), 1)],
        flows_counted_ms_ago: Some(10),
        flows_count_took_ms: Some(1),
        flow_table: Some(FlowTable {
            live: 1,
            closing: 0,
            idle: 0,
            expired: 0,
            capacity: Some(1024),
            ..FlowTable::default()
        }),
        fleet: Some(FleetView {
            node: "lb1".into(),
            connected: true,
            services: vec![FleetService {
                name: "web".into(),
                revision: 2,
                applied_revision: 2,
                ..FleetService::default()
            }],
            ..FleetView::default()
        }),
        ..Response::default()
    };
    let served = switcher_user::agent::metrics::render(&status).expect("render");
    let served: Vec<&str> =
        served.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.split(['{', ' ']).next()).collect();
    let mut used =
        metric_names(&std::fs::read_to_string(dist().join("prometheus/switcher-alerts.yml")).expect("rules"));
    used.extend(dashboard_queries().iter().flat_map(|q| metric_names(q)));
    used.sort();
    used.dedup();
    assert!(used.len() >= 15, "{used:?}");
    for name in &used {
        assert!(
            served.contains(&name.as_str()),
            "{name} is used by the dashboard or alerts but not served:\n{served:?}"
        );
    }
}

/// A Prometheus process in a namespace, killed (by its PID) and its directory removed on drop.
struct Prometheus {
    child: Child,
    dir: PathBuf,
    ns: crate::net::Netns,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Prometheus {
    /// Starts Prometheus in namespace `ns`, scraping the daemon's 127.0.0.1:9477 every second and
    /// loading the shipped alert rules; waits up to 30 s until it is ready.
    fn start(ns: &str) -> Prometheus {
        let dir = std::env::temp_dir().join(format!("switcher-prometheus-{}", crate::net::unique_prefix()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("prometheus dir");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: switcher\n    static_configs:\n      - targets: ['127.0.0.1:9477']\n",
            dist().join("prometheus/switcher-alerts.yml").display()
        );
        std::fs::write(dir.join("prometheus.yml"), config).expect("prometheus config");
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("prometheus log");
        // `ip netns exec` execs Prometheus in place: the child's PID is Prometheus's.
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "prometheus"])
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus (`./x test` installs Debian's prometheus)");
        let mut p = Prometheus { child, dir, ns: crate::net::Netns::attach(ns) };
        let ready = wait_for(Duration::from_secs(30), || {
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!("prometheus exited ({status}):\n{}", p.log());
            }
            p.get("/-/ready").ok().filter(|(code, _)| *code == 200)
        });
        assert!(ready.is_some(), "prometheus was not ready in 30 s:\n{}", p.log());
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// `GET path` from Prometheus: status code and body.
    fn get(&self, path: &str) -> std::io::Result<(u16, String)> {
        let path = path.to_owned();
        self.ns.run(move || {
            let mut s = TcpStream::connect(("127.0.0.1", PROMETHEUS_PORT))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())?;
            let mut answer = String::new();
            s.read_to_string(&mut answer)?;
            let code = answer.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
            Ok((code, answer.split_once("\r\n\r\n").map_or(String::new(), |(_, b)| b.to_owned())))
        })
    }

    /// An API call's `data`, or why not.
    fn api(&self, path: &str) -> Result<serde_json::Value, String> {
        let (code, body) = self.get(path).map_err(|e| e.to_string())?;
        let json: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        if code != 200 || json["status"] != "success" {
            return Err(format!("{code}: {body}"));
        }
        Ok(json["data"].clone())
    }

    /// The series a range query returns over the last `seconds`, one point a second.
    fn range(&self, query: &str, seconds: u64) -> Result<Vec<serde_json::Value>, String> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let data = self.api(&format!(
            "/api/v1/query_range?query={}&start={}&end={now}&step=1",
            encode(query),
            now.saturating_sub(seconds)
        ))?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A dashboard query with Grafana's variables filled in as for the service `web` on every
/// node.
fn fill(query: &str) -> String {
    let q = query
        .replace("${service:regex}", "web")
        .replace("$service", "web")
        .replace("$instance", ".*")
        .replace("$__rate_interval", "15s");
    assert!(!q.contains('$'), "a variable of the dashboard is not filled in by this test: {q}");
    q
}

#[test]
fn every_dashboard_query_returns_series_from_a_real_prometheus() {
    const NAME: &str = "every_dashboard_query_returns_series_from_a_real_prometheus";
    if !crate::have_root(NAME) {
        return;
    }
    if !have("prometheus") {
        crate::skip(NAME, "prometheus is not installed (apt install prometheus; ./x installs it when run as root)");
        return;
    }
    let t = Topology::new();
    let (_b, _g) = (Server::start(&t.blue, "blue"), Server::start(&t.green, "green"));
    let d = Daemon::start(&t.lb, |s| demo_config(&t.lb_ifaces, "redirect", s));
    let started = std::time::Instant::now();
    let prom = Prometheus::start(&t.lb.name);
    let up = wait_for(Duration::from_secs(30), || {
        prom.api("/api/v1/query?query=up")
            .ok()
            .filter(|d| d["result"].as_array().is_some_and(|r| r.iter().any(|s| s["value"][1] == "1")))
    });
    assert!(up.is_some(), "prometheus does not scrape the daemon (up != 1):\n{}", prom.log());

    // Traffic on blue, a cut-over to green (once green's checks pass), a canary back to blue,
    // and traffic again.
    for _ in 0..10 {
        tcp_request(&t.client, WEB).expect("web on blue");
        udp_request(&t.client, DNS).expect("dns on blue");
    }
    let switched =
        wait_for(Duration::from_secs(20), || d.cli(&["cutover", "web", "green"]).status.success().then_some(()));
    assert!(switched.is_some(), "cutover web green was refused:\n{}", d.log());
    for _ in 0..10 {
        tcp_request(&t.client, WEB).expect("web on green");
    }
    std::thread::sleep(Duration::from_secs(3));
    d.cli_ok(&["weight", "web", "blue=10%"]);
    for _ in 0..10 {
        tcp_request(&t.client, WEB).expect("web during the canary");
    }
    // Prometheus has seen the cut-over.
    let seen = wait_for(Duration::from_secs(30), || {
        prom.range(r#"switcher_cutovers_total{service="web",kind="cutover"} == 1"#, 60).ok().filter(|r| !r.is_empty())
    });
    assert!(seen.is_some(), "prometheus never saw the cut-over:\n{}", prom.log());

    // Every query of the dashboard returns series over the test's span.
    let span = started.elapsed().as_secs() + 5;
    let queries = dashboard_queries();
    assert!(queries.len() >= 15, "{queries:?}");
    for q in &queries {
        let filled = fill(q);
        let mut last = String::new();
        // A rate needs two scrapes inside its window: a few seconds at most.
        let series = wait_for(Duration::from_secs(20), || match prom.range(&filled, span) {
            Ok(r) if !r.is_empty() => Some(r),
            Ok(_) => None,
            Err(e) => {
                last = e;
                None
            }
        });
        assert!(series.is_some(), "no series for the dashboard query\n  {filled}\n{last}\n{}", prom.log());
    }
    // The variables' queries: label_values(switcher_active, instance / service).
    for (label, want) in [("instance", "127.0.0.1:9477"), ("service", "web")] {
        let values = prom.api(&format!("/api/v1/label/{label}/values?match[]=switcher_active")).expect("label values");
        assert!(values.as_array().is_some_and(|v| v.iter().any(|x| x == want)), "{label} values: {values}");
    }
    // Prometheus loaded the shipped alert rules and evaluates them without error.
    let rules = prom.api("/api/v1/rules").expect("rules");
    let loaded: Vec<&serde_json::Value> = rules["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .collect();
    assert_eq!(loaded.len(), 8, "alert rules loaded: {rules}");
    let broken: Vec<&serde_json::Value> = loaded.iter().copied().filter(|r| r["health"] == "err").collect();
    assert!(broken.is_empty(), "rules that fail to evaluate: {broken:?}");
    drop(prom);
    drop(d);
}
