//! The Prometheus endpoint: `GET /metrics` on the configured address (default
//! 127.0.0.1:9477), in the OpenMetrics text format, built with `prometheus-client` from a
//! fresh status snapshot at every scrape (the counters themselves live in the BPF maps; the open
//! flows come from the last pass of the flow counter, `switcher_open_flows_age_seconds` old).

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::AtomicU64},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use prometheus_client::{
    encoding::{EncodeMetric, MetricEncoder, text::encode},
    metrics::{MetricType, TypedMetric, counter::Counter, exemplar::Exemplar, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};

use switcher_common::BP_ALL;

use crate::{
    dataplane::Dataplane,
    engine::Handle,
    fleet::Fleet,
    protocol::{Health, Response},
};

type Labels = Vec<(String, String)>;

/// A histogram whose buckets the data path counted (`ColourCounters::syn_latency`): the
/// counts are set, not observed. The data path keeps no sum: `_sum` is estimated from each
/// bucket's middle (the last bucket's lower bound for the open one).
#[derive(Debug, Default)]
struct Buckets {
    counts: [AtomicU64; 5],
}

/// Upper bounds of the SYN latency buckets, in seconds, and the value each counts as in `_sum`.
const SYN_BOUNDS: [(f64, f64); 5] =
    [(0.000_1, 0.000_05), (0.001, 0.000_55), (0.01, 0.005_5), (0.1, 0.055), (f64::INFINITY, 0.1)];

impl Buckets {
    fn set(&self, counts: &[u64; 5]) {
        for (c, n) in self.counts.iter().zip(counts) {
            c.store(*n, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

impl TypedMetric for Buckets {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Buckets {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let counts: Vec<u64> = self.counts.iter().map(|c| c.load(std::sync::atomic::Ordering::Relaxed)).collect();
        let buckets: Vec<(f64, u64)> = SYN_BOUNDS.iter().zip(&counts).map(|((le, _), n)| (*le, *n)).collect();
        #[expect(clippy::cast_precision_loss, reason = "an estimate")]
        let sum = SYN_BOUNDS.iter().zip(&counts).map(|((_, mid), n)| mid * *n as f64).sum();
        let none: Option<&std::collections::HashMap<usize, Exemplar<Labels, f64>>> = None;
        encoder.encode_histogram(sum, counts.iter().sum(), &buckets, none)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

/// Renders a status snapshot as OpenMetrics text.
///
/// # Errors
/// Formatting failed (it does not, into a `String`).
/// The states a rollout is shown in (`protocol::RolloutStatus::state`).
const ROLLOUT_STATES: [&str; 10] = [
    "running",
    "paused",
    "holding",
    "hook",
    "watching",
    "complete",
    "aborted",
    "interrupted",
    "rolled back",
    "superseded",
];

pub fn render(status: &Response) -> Result<String, std::fmt::Error> {
    let mut reg = Registry::with_prefix("switcher");
    let packets = Family::<Labels, Counter>::default();
    let bytes = Family::<Labels, Counter>::default();
    let flows = Family::<Labels, Counter>::default();
    let rescued = Family::<Labels, Counter>::default();
    let evicted = Family::<Labels, Counter>::default();
    let syns = Family::<Labels, Counter>::default();
    let handshakes = Family::<Labels, Counter>::default();
    let refused = Family::<Labels, Counter>::default();
    let backend_resets = Family::<Labels, Counter>::default();
    let unreachables = Family::<Labels, Counter>::default();
    let retransmits = Family::<Labels, Counter>::default();
    let client_resets = Family::<Labels, Counter>::default();
    let syn_latency = Family::<Labels, Buckets>::default();
    let open = Family::<Labels, Gauge>::default();
    let closing = Family::<Labels, Gauge>::default();
    let draining = Family::<Labels, Gauge>::default();
    let backend_up = Family::<Labels, Gauge>::default();
    let colour_healthy = Family::<Labels, Gauge>::default();
    let active = Family::<Labels, Gauge>::default();
    let share = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    let cutovers = Family::<Labels, Counter>::default();
    let last_cutover = Family::<Labels, Gauge>::default();
    let verdicts = Family::<Labels, Counter>::default();
    let rollout_step = Family::<Labels, Gauge>::default();
    let rollout_state = Family::<Labels, Gauge>::default();
    let backup_left = Family::<Labels, Gauge>::default();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs();
    for s in &status.services {
        let name = s.name.as_str();
        for (kind, n) in s.switch_kinds.labelled() {
            cutovers.get_or_create(&labels(&[("service", name), ("kind", kind)])).inc_by(n);
        }
        if let Some(r) = &s.rollout {
            rollout_step.get_or_create(&labels(&[("service", name)])).set(i64::try_from(r.step).unwrap_or(0));
            for state in ROLLOUT_STATES {
                rollout_state
                    .get_or_create(&labels(&[("service", name), ("state", state)]))
                    .set(i64::from(r.state == state));
            }
        }
        if let Some(b) = &s.backup {
            backup_left
                .get_or_create(&labels(&[("service", name), ("colour", b.colour.as_str())]))
                .set(i64::try_from(b.secs_left).unwrap_or(i64::MAX));
        }
        if let Some(ago) = s.since_switch_secs {
            last_cutover.get_or_create(&labels(&[("service", name)])).set(i64::try_from(now - ago).unwrap_or(0));
        }
        for c in &s.colours {
            let col = c.colour.as_str();
            let k = &c.counters;
            for (dir, p, b) in [("request", k.packets, k.bytes), ("reply", k.reply_packets, k.reply_bytes)] {
                packets.get_or_create(&labels(&[("service", name), ("colour", col), ("direction", dir)])).inc_by(p);
                bytes.get_or_create(&labels(&[("service", name), ("colour", col), ("direction", dir)])).inc_by(b);
            }
            let sc = labels(&[("service", name), ("colour", col)]);
            flows.get_or_create(&sc).inc_by(k.flows);
            rescued.get_or_create(&sc).inc_by(k.rescued);
            evicted.get_or_create(&sc).inc_by(k.evicted);
            syns.get_or_create(&sc).inc_by(k.syns);
            handshakes.get_or_create(&sc).inc_by(k.handshakes);
            refused.get_or_create(&sc).inc_by(k.refused);
            backend_resets.get_or_create(&sc).inc_by(k.backend_resets);
            unreachables.get_or_create(&sc).inc_by(k.icmp_unreachables);
            retransmits.get_or_create(&sc).inc_by(k.syn_retransmits);
            client_resets.get_or_create(&sc).inc_by(k.client_resets);
            syn_latency.get_or_create(&sc).set(&k.syn_latency);
            open.get_or_create(&sc).set(i64::try_from(c.live_flows).unwrap_or(i64::MAX));
            closing.get_or_create(&sc).set(i64::try_from(c.closing_flows).unwrap_or(i64::MAX));
            let drain = s.drain.as_ref().filter(|d| d.colour == c.colour).map_or(0, |d| d.live_flows);
            draining.get_or_create(&sc).set(i64::try_from(drain).unwrap_or(i64::MAX));
            colour_healthy.get_or_create(&sc).set(i64::from(c.healthy));
            active.get_or_create(&sc).set(i64::from(s.active == c.colour));
            share.get_or_create(&sc).set(f64::from(s.share_of(c.colour)) / f64::from(BP_ALL));
            for b in &c.backends {
                let state = match b.health {
                    Health::Up => 1,
                    Health::Down => 0,
                    Health::Unknown => -1,
                };
                backend_up
                    .get_or_create(&labels(&[("service", name), ("colour", col), ("backend", b.address.as_str())]))
                    .set(state);
            }
        }
    }
    reg.register(
        "rollout_step",
        "Step of the service's rollout (1-based, as `switcher rollout status` numbers them)",
        rollout_step,
    );
    reg.register(
        "rollout_state",
        "1 for the state the service's rollout is in (running, paused, holding, hook, watching, complete, aborted, interrupted)",
        rollout_state,
    );
    reg.register(
        "rollout_backup_seconds_left",
        "Seconds the old colour of a completed rollout stays the backup",
        backup_left,
    );
    shadow_metrics(&mut reg, status);
    let fleet_connected = Family::<Labels, Gauge>::default();
    let desired_rev = Family::<Labels, Gauge>::default();
    let applied_rev = Family::<Labels, Gauge>::default();
    let overridden = Family::<Labels, Gauge>::default();
    if let Some(f) = &status.fleet {
        fleet_connected.get_or_create(&labels(&[("node", f.node.as_str())])).set(i64::from(f.connected));
        for s in &f.services {
            let l = labels(&[("service", s.name.as_str())]);
            desired_rev.get_or_create(&l).set(s.revision);
            applied_rev.get_or_create(&l).set(s.applied_revision);
            overridden.get_or_create(&l).set(i64::from(s.local_override.is_some()));
        }
        reg.register(
            "fleet_etcd_connected",
            "1 while etcd answers; 0: forwarding with the last applied state",
            fleet_connected,
        );
        reg.register(
            "fleet_desired_revision",
            "etcd revision of each service's desired state, as last read",
            desired_rev,
        );
        reg.register(
            "fleet_applied_revision",
            "etcd revision of the desired state this node applied last",
            applied_rev,
        );
        reg.register("fleet_local_override", "1 while this node does not follow the fleet's desired state", overridden);
    }
    if let Some(ago) = status.flows_counted_ms_ago {
        let age = Gauge::<f64, AtomicU64>::default();
        age.set(Duration::from_millis(ago).as_secs_f64());
        reg.register(
            "open_flows_age_seconds",
            "How old the open-flow counts are: they come from the last complete pass over the flow table",
            age,
        );
    }
    if let Some(took) = status.flows_count_took_ms {
        let pass = Gauge::<f64, AtomicU64>::default();
        pass.set(Duration::from_millis(took).as_secs_f64());
        reg.register("flow_count_pass_seconds", "How long the last pass over the flow table took", pass);
    }
    for (reason, n) in &status.reasons {
        verdicts.get_or_create(&labels(&[("reason", reason.as_str()), ("kind", verdict_kind(reason))])).inc_by(*n);
    }
    if let Some(t) = &status.flow_table {
        let entries = Family::<Labels, Gauge>::default();
        for (state, n) in [("live", t.live), ("closing", t.closing), ("idle", t.idle), ("expired", t.expired)] {
            entries.get_or_create(&labels(&[("state", state)])).set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        reg.register(
            "flow_table_entries",
            "Entries of the flow table by state, from the last pass over it (expired ones wait for a new flow of their set to reuse them)",
            entries,
        );
        if let Some(cap) = t.capacity {
            let capacity = Gauge::<i64>::default();
            capacity.set(i64::try_from(cap).unwrap_or(i64::MAX));
            reg.register(
                "flow_table_capacity",
                "Entries the flow table holds (max_flows); when live ones fill it, new flows evict open ones",
                capacity,
            );
        }
    }
    reg.register("packets", "Packets through the data path per service, colour and direction", packets);
    reg.register("bytes", "L3 bytes through the data path per service, colour and direction", bytes);
    reg.register("flows", "Flows given to each colour", flows);
    reg.register(
        "rescued_flows",
        "TCP connections found without a flow while the service drained (moved from another node, or evicted), sent back to this, the previous, colour",
        rescued,
    );
    reg.register(
        "evicted_flows",
        "Open flows of a colour whose slot in the flow table a new flow took, their set of 4 slots full of flows that had not ended: the table is too small for the load (raise max_flows)",
        evicted,
    );
    reg.register("syns", "TCP flows begun by a SYN, per colour (NAT: a retransmitted SYN counts again)", syns);
    reg.register(
        "handshakes",
        "NAT: SYN-ACKs from a colour's backends answering a flow's SYN (completed handshakes)",
        handshakes,
    );
    reg.register(
        "refused",
        "NAT: SYNs a colour's backends answered with an RST or an ICMP unreachable instead of a SYN-ACK",
        refused,
    );
    reg.register(
        "backend_resets",
        "NAT: RSTs from a colour's backends on flows not closing yet (refusals included)",
        backend_resets,
    );
    reg.register(
        "icmp_unreachables",
        "NAT: ICMP destination unreachables from a colour's backends about live flows",
        unreachables,
    );
    reg.register(
        "syn_retransmits",
        "DSR: SYNs on a 5-tuple whose flow is open (the client got no SYN-ACK in time)",
        retransmits,
    );
    reg.register("client_resets", "RSTs from clients on flows not closing yet, per colour", client_resets);
    reg.register_with_unit(
        "syn_latency",
        "NAT: SYN to SYN-ACK latency seen at the load balancer, per colour, of the timed SYNs (every SYN up to 64 per CPU per second, then one in 8; buckets counted by the data path; _sum estimated from the buckets' middles)",
        prometheus_client::registry::Unit::Seconds,
        syn_latency,
    );
    reg.register("open_flows", "Open (tracked, not closing) flows per colour", open);
    reg.register("closing_flows", "TCP flows per colour that saw FIN or RST, kept a few seconds", closing);
    reg.register("draining_flows", "Open flows left on a colour that is draining", draining);
    reg.register("backend_up", "Backend health: 1 up, 0 down, -1 unknown or unchecked", backend_up);
    reg.register("colour_healthy", "Whether a colour can take traffic", colour_healthy);
    reg.register("active", "1 for the active colour of each service", active);
    reg.register(
        "share_ratio",
        "Share of new flows per colour, 0 to 1 (a canary sends a share to the other colour)",
        share,
    );
    reg.register(
        "cutovers",
        "Switches of the active colour since the daemon started, by kind: cutover, rollback, auto_rollback (the watch window saw the new colour fail), failover",
        cutovers,
    );
    reg.register("last_cutover_timestamp_seconds", "Unix time of the last switch", last_cutover);
    reg.register(
        "datapath_verdicts",
        "Packets per data-path verdict reason; kind: forwarded (rewritten), passed (not a service's, untouched), dropped, reset (a drain timeout's RST), failed (a service's packet that could not be switched)",
        verdicts,
    );
    let mut out = String::new();
    encode(&mut out, &reg)?;
    Ok(out)
}

/// What a data-path verdict reason means for the packet, as the `kind` label of
/// `switcher_datapath_verdicts_total` (a function of the reason: it adds no series).
#[must_use]
pub fn verdict_kind(reason: &str) -> &'static str {
    match reason {
        "fwd_redirect" | "fwd_kernel" | "reply_redirect" | "reply_kernel" | "dsr" | "icmp_fwd" | "icmp_reply"
        | "shadow_fwd" => "forwarded",
        // The idle colour's replies to shadow copies: never for the client.
        "dsr_no_neigh" | "shadow_reply" => "dropped",
        "reset" => "reset",
        "no_backend" | "internal" => "failed",
        // not_ip, vlan, malformed, fragment, other_l4, no_match, ttl, ipv6_ext, not_live: the
        // program passes what it does not switch, byte-identical; a reason added later counts
        // here until it is named above (the unit test lists every known reason).
        _ => "passed",
    }
}

/// Serves `GET /metrics` until the task is aborted: at most
/// [`crate::limits::METRICS_CONNECTIONS`] connections at once (more are closed as soon as they
/// are accepted), and a pause after a failed accept instead of a spin.
pub async fn serve(addr: SocketAddr, engine: Handle<Dataplane>, fleet: Option<Arc<Fleet>>, flow_capacity: u64) {
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("metrics endpoint on {addr}: {e}; metrics are off");
            return;
        }
    };
    tracing::info!(%addr, "metrics endpoint ready (GET /metrics)");
    let slots = Arc::new(tokio::sync::Semaphore::new(crate::limits::METRICS_CONNECTIONS));
    let mut backoff = AcceptBackoff::default();
    loop {
        let mut conn = match listener.accept().await {
            Ok((conn, _)) => {
                backoff.reset();
                conn
            }
            Err(e) => {
                // EMFILE and the like: the pending connection stays queued, so accepting again
                // at once would spin.
                tokio::time::sleep(backoff.next(&e)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            let _ =
                conn.try_write(b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            continue;
        };
        let engine = engine.clone();
        let fleet = fleet.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            // The request line and headers, bounded in size and time.
            let read = tokio::time::timeout(Duration::from_secs(2), async {
                while n < buf.len() && !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k,
                    }
                }
            })
            .await;
            let wanted =
                read.is_ok() && (buf[..n].starts_with(b"GET /metrics ") || buf[..n].starts_with(b"GET /metrics?"));
            let (status, body) = if wanted {
                let mut snapshot = engine.call(|b| b.status(None).ok()).await.ok().flatten();
                if let Some(t) = snapshot.as_mut().and_then(|s| s.flow_table.as_mut()) {
                    t.capacity = Some(flow_capacity);
                }
                if let (Some(s), Some(f)) = (&mut snapshot, &fleet) {
                    let names: Vec<String> = s.services.iter().map(|x| x.name.clone()).collect();
                    s.fleet = Some(f.local_view(&names));
                    // A fleet's rollout and its backup, as every node shows them in `status`.
                    f.show_rollouts(&mut s.services);
                }
                match snapshot.map(|s| render(&s)) {
                    Some(Ok(text)) => ("200 OK", text),
                    _ => ("500 Internal Server Error", "status unavailable\n".to_owned()),
                }
            } else {
                ("404 Not Found", "only GET /metrics is served here\n".to_owned())
            };
            let head = format!(
                "HTTP/1.0 {status}\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes()).await;
            let _ = conn.write_all(body.as_bytes()).await;
        });
    }
}

/// The pause after a failed accept: 10 ms, doubling up to 640 ms while accepts keep failing;
/// one warning per run of failures.
#[derive(Debug, Default)]
pub(crate) struct AcceptBackoff {
    failures: u32,
}

impl AcceptBackoff {
    pub(crate) fn next(&mut self, e: &std::io::Error) -> Duration {
        if self.failures == 0 {
            tracing::warn!("accept on the metrics endpoint: {e}; pausing between retries");
        }
        self.failures = self.failures.saturating_add(1);
        Duration::from_millis(10u64 << (self.failures - 1).min(6))
    }

    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }
}

/// Shadow traffic, per service and colour (`switcher shadow`): share, copies, idle replies
/// dropped and each colour's reply latency on shadowed flows.
fn shadow_metrics(reg: &mut Registry, status: &Response) {
    let share = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    let served = Family::<Labels, Counter>::default();
    let copies = Family::<Labels, Counter>::default();
    let replies = Family::<Labels, Counter>::default();
    let latency_sum = Family::<Labels, Counter<f64, AtomicU64>>::default();
    let latency_count = Family::<Labels, Counter>::default();
    for s in &status.services {
        let Some(sh) = &s.shadow else { continue };
        let name = s.name.as_str();
        share.get_or_create(&labels(&[("service", name)])).set(f64::from(sh.share_bp) / f64::from(BP_ALL));
        for c in &sh.colours {
            let col = c.colour.as_str();
            let sc = labels(&[("service", name), ("colour", col)]);
            served.get_or_create(&sc).inc_by(c.shadowed);
            for (outcome, n) in [("sent", c.sent), ("over_ceiling", c.over_ceiling), ("failed", c.failed)] {
                copies.get_or_create(&labels(&[("service", name), ("colour", col), ("outcome", outcome)])).inc_by(n);
            }
            replies.get_or_create(&sc).inc_by(c.replies_dropped);
            latency_sum.get_or_create(&sc).inc_by(c.latency_ns as f64 / 1e9);
            latency_count.get_or_create(&sc).inc_by(c.latency_count);
        }
    }
    reg.register("shadow_share", "Share of the service's new flows copied to the idle colour (0 to 1)", share);
    reg.register("shadow_served_datagrams", "Datagrams of shadowed flows the colour served (live side)", served);
    reg.register(
        "shadow_copies",
        "Copies of shadowed datagrams for the colour (idle side), by outcome: sent, over_ceiling, failed",
        copies,
    );
    reg.register(
        "shadow_replies_dropped",
        "The colour's replies to copies, dropped before reaching the client",
        replies,
    );
    reg.register(
        "shadow_reply_latency_seconds",
        "Sum of the colour's reply latencies on shadowed flows; divided by switcher_shadow_replies_timed_total, the mean (compare colours on the same requests)",
        latency_sum,
    );
    reg.register(
        "shadow_replies_timed",
        "Replies timed for switcher_shadow_reply_latency_seconds_total",
        latency_count,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{
        BackendStatus, Colour, ColourStatus, Counters, FleetService, FleetView, Mode, Protocol, ServiceStatus,
    };

    #[test]
    fn a_failing_accept_backs_off_instead_of_spinning() {
        let mut b = AcceptBackoff::default();
        let e = std::io::Error::from_raw_os_error(libc::EMFILE);
        let pauses: Vec<u128> = (0..10).map(|_| b.next(&e).as_millis()).collect();
        assert_eq!(pauses, [10, 20, 40, 80, 160, 320, 640, 640, 640, 640]);
        b.reset();
        assert_eq!(b.next(&e).as_millis(), 10);
    }

    #[test]
    fn metrics_name_services_colours_and_reasons() {
        let mut status = Response {
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
                switches: 3,
                switch_kinds: crate::protocol::SwitchKinds { cutover: 2, rollback: 0, auto_rollback: 1, failover: 0 },
                since_switch_secs: Some(5),
                watch_secs_left: None,
                drain: None,
                rollout: None,
                backup: None,
                shadow: None,
                colours: vec![ColourStatus {
                    colour: Colour::Green,
                    healthy: true,
                    backends: vec![BackendStatus {
                        address: "198.51.100.18:8080".into(),
                        weight: 1,
                        health: Health::Up,
                        detail: None,
                    }],
                    live_flows: 7,
                    closing_flows: 1,
                    counters: Counters {
                        packets: 10,
                        bytes: 600,
                        reply_packets: 9,
                        reply_bytes: 500,
                        flows: 4,
                        rescued: 3,
                        syns: 4,
                        handshakes: 3,
                        refused: 1,
                        backend_resets: 2,
                        icmp_unreachables: 0,
                        syn_retransmits: 0,
                        client_resets: 1,
                        evicted: 5,
                        syn_latency: [2, 1, 0, 0, 0],
                    },
                    edited: false,
                }],
            }],
            reasons: vec![("no_match".into(), 12), ("dsr_no_neigh".into(), 2)],
            flow_table: Some(crate::protocol::FlowTable {
                live: 7,
                closing: 1,
                idle: 0,
                expired: 4,
                capacity: Some(1024),
                ..crate::protocol::FlowTable::default()
            }),
            ..Response::default()
        };
        status.services[0].rollout = Some(crate::protocol::RolloutStatus {
            from: Colour::Blue,
            to: Colour::Green,
            state: "holding".into(),
            step: 2,
            steps: vec!["10%".into(), "pause 60s".into(), "100%".into()],
            step_secs: 70,
            share_bp: 1_000,
            judgement: None,
            reason: None,
            drill: false,
            driver: None,
            judged_from: None,
        });
        status.services[0].backup = Some(crate::protocol::Backup { colour: Colour::Blue, secs_left: 30 });
        let text = render(&status).expect("render");
        for line in [
            "switcher_packets_total{service=\"web\",colour=\"green\",direction=\"request\"} 10",
            "switcher_open_flows{service=\"web\",colour=\"green\"} 7",
            "switcher_rescued_flows_total{service=\"web\",colour=\"green\"} 3",
            "switcher_evicted_flows_total{service=\"web\",colour=\"green\"} 5",
            "switcher_handshakes_total{service=\"web\",colour=\"green\"} 3",
            "switcher_backend_resets_total{service=\"web\",colour=\"green\"} 2",
            "switcher_refused_total{service=\"web\",colour=\"green\"} 1",
            "switcher_client_resets_total{service=\"web\",colour=\"green\"} 1",
            "switcher_icmp_unreachables_total{service=\"web\",colour=\"green\"} 0",
            "switcher_syn_retransmits_total{service=\"web\",colour=\"green\"} 0",
            "switcher_syn_latency_seconds_bucket{le=\"0.001\",service=\"web\",colour=\"green\"} 3",
            "switcher_syn_latency_seconds_bucket{le=\"+Inf\",service=\"web\",colour=\"green\"} 3",
            "switcher_syn_latency_seconds_count{service=\"web\",colour=\"green\"} 3",
            "switcher_backend_up{service=\"web\",colour=\"green\",backend=\"198.51.100.18:8080\"} 1",
            "switcher_active{service=\"web\",colour=\"green\"} 1",
            "switcher_closing_flows{service=\"web\",colour=\"green\"} 1",
            "switcher_share_ratio{service=\"web\",colour=\"green\"} 1.0",
            "switcher_cutovers_total{service=\"web\",kind=\"cutover\"} 2",
            "switcher_cutovers_total{service=\"web\",kind=\"auto_rollback\"} 1",
            "switcher_cutovers_total{service=\"web\",kind=\"failover\"} 0",
            "switcher_datapath_verdicts_total{reason=\"no_match\",kind=\"passed\"} 12",
            "switcher_datapath_verdicts_total{reason=\"dsr_no_neigh\",kind=\"dropped\"} 2",
            "switcher_flow_table_entries{state=\"live\"} 7",
            "switcher_flow_table_entries{state=\"expired\"} 4",
            "switcher_flow_table_capacity 1024",
        ] {
            assert!(text.contains(line), "missing {line}:\n{text}");
        }
        for line in [
            "switcher_rollout_step{service=\"web\"} 2",
            "switcher_rollout_state{service=\"web\",state=\"holding\"} 1",
            "switcher_rollout_state{service=\"web\",state=\"running\"} 0",
            "switcher_rollout_backup_seconds_left{service=\"web\",colour=\"blue\"} 30",
        ] {
            assert!(text.contains(line), "missing {line}:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
        assert!(!text.contains("fleet"), "no fleet metrics without a fleet");
    }

    #[test]
    fn every_verdict_reason_has_a_kind() {
        use switcher_common::Reason;
        let passed = ["not_ip", "vlan", "malformed", "fragment", "other_l4", "no_match", "ttl", "ipv6_ext", "not_live"];
        for name in Reason::NAMES {
            let kind = verdict_kind(name);
            // "passed" is also the fallback: a reason there must be listed as one.
            assert!(
                kind != "passed" || passed.contains(&name),
                "reason {name} falls through to \"passed\": classify it"
            );
        }
        assert_eq!(verdict_kind("dsr_no_neigh"), "dropped");
        assert_eq!(verdict_kind("no_backend"), "failed");
        assert_eq!(verdict_kind("fwd_redirect"), "forwarded");
    }

    #[test]
    fn fleet_metrics_say_whether_etcd_answers() {
        let status = Response {
            ok: true,
            fleet: Some(FleetView {
                node: "lb1".into(),
                connected: false,
                services: vec![FleetService {
                    name: "web".into(),
                    revision: 9,
                    applied_revision: 7,
                    local_override: Some("etcd down".into()),
                    ..FleetService::default()
                }],
                ..FleetView::default()
            }),
            ..Response::default()
        };
        let text = render(&status).expect("render");
        for line in [
            "switcher_fleet_etcd_connected{node=\"lb1\"} 0",
            "switcher_fleet_desired_revision{service=\"web\"} 9",
            "switcher_fleet_applied_revision{service=\"web\"} 7",
            "switcher_fleet_local_override{service=\"web\"} 1",
        ] {
            assert!(text.contains(line), "missing {line}:\n{text}");
        }
    }
}
