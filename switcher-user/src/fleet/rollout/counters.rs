//! A fleet rollout judged from the whole fleet's traffic, not the driver's share of it.
//!
//! ```text
//! {prefix}/counters/{service}/{node}   the node's counters of both colours (JSON
//!                                      `NodeCounters`), under the node's lease
//! ```
//!
//! While a rollout (or drill) of a service runs, every node that has the service writes its
//! per-colour counters there about once a second; when none runs, nothing (the key of a
//! rollout that ended is deleted once). They sit apart from `nodes/` so that the driver reads
//! one service's counters of every node with one range read, and apart from `rollouts/`,
//! which every node watches. The driver sums, field by field ([`Counters::sum`]), its own
//! counters and the latest of every other node, those older than [`STALE_MS`] left out and
//! named; a pause's window is the sum now against the sum of the same nodes at its start (a
//! node that appears meanwhile counts from its first reading; one whose counters went back,
//! a restarted data path, begins again from its new reading). The judgement is the one of a
//! rollout on one node ([`judge`](crate::engine::rollout::judge)), unchanged.

use std::collections::{BTreeMap, HashSet};

use super::{Drive, Driver, FleetRollout, RUNNING, Store};
use crate::{
    dataplane::Counters,
    engine::{
        Handle, Maps,
        rollout::{Thresholds, Window},
    },
    fleet::Fleet,
    protocol::{Colour, NodeCounters},
};

/// A node's counters older than this are left out of a judgement (they are written about
/// once a second).
pub(super) const STALE_MS: u64 = 5_000;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A pause's window over the fleet, and what judges it.
pub(super) struct Judged {
    /// `[from, to]` over the window, summed over the nodes.
    pub windows: [Window; 2],
    pub to_healthy: bool,
    pub replies_seen: bool,
    pub thresholds: Thresholds,
    /// Whose counters: `2 nodes (lb0, lb1)`, and those left out.
    pub from: String,
}

/// Counters of one colour of a node's published pair.
fn of(n: &NodeCounters, c: Colour) -> Counters {
    match c {
        Colour::Blue => n.blue,
        Colour::Green => n.green,
    }
}

/// The windows of `now` against `base` (`node → [from, to]`), summed over the nodes in
/// both; nodes new in `now`, or whose counters went back, are taken into `base` (they count
/// from now on).
pub(super) fn windows(
    base: &mut BTreeMap<String, [Counters; 2]>,
    now: &BTreeMap<String, [Counters; 2]>,
) -> [Window; 2] {
    for (node, c) in now {
        let restarted = base.get(node).is_some_and(|b| (0..2).any(|i| c[i].packets < b[i].packets));
        if restarted || !base.contains_key(node) {
            base.insert(node.clone(), *c);
        }
    }
    let nodes: Vec<&String> = now.keys().collect();
    let sum = |m: &BTreeMap<String, [Counters; 2]>, i: usize| {
        Counters::sum(nodes.iter().filter_map(|n| m.get(*n)).map(|c| &c[i]))
    };
    [0, 1].map(|i| Window::between(sum(base, i), sum(now, i)))
}

/// What `judged_from` says: the nodes counted, and those left out.
pub(super) fn described(counted: &[&String], stale: &[(String, u64)]) -> String {
    let names: Vec<&str> = counted.iter().map(|n| n.as_str()).collect();
    let mut text = format!("{} node{} ({})", names.len(), if names.len() == 1 { "" } else { "s" }, names.join(", "));
    if !stale.is_empty() {
        let out: Vec<String> = stale.iter().map(|(n, age)| format!("{n}, counters {}s old", age / 1_000)).collect();
        text.push_str(&format!("; left out: {}", out.join("; ")));
    }
    text
}

impl Fleet {
    fn counters_prefix(&self, name: &str) -> String {
        format!("{}/counters/{name}/", self.config.prefix)
    }
}

impl Driver {
    /// Every second, on every node: publishes this node's counters of each service with a
    /// rollout running (that this node has), and deletes those of rollouts that ended.
    pub(in crate::fleet) async fn publish_counters<M: Maps + Send + 'static, S: Store>(
        &mut self,
        fleet: &Fleet,
        engine: &Handle<M>,
        client: &mut S,
    ) -> Result<(), String> {
        let running: HashSet<String> = fleet
            .lock()
            .rollouts
            .records
            .iter()
            .filter(|(_, (r, _))| r.state == RUNNING)
            .map(|(n, _)| n.clone())
            .collect();
        let me = fleet.config.node.clone();
        for name in &running {
            let n = name.clone();
            let sample = engine.call(move |b| b.rollout_sample(&n, Colour::Blue, Colour::Green)).await;
            let Ok(Ok(sample)) = sample else { continue };
            let value = NodeCounters {
                node: me.clone(),
                at_unix_ms: now_ms(),
                blue: sample.counters[0],
                green: sample.counters[1],
            };
            let text = serde_json::to_string(&value).map_err(|e| e.to_string())?;
            client.put(&format!("{}{me}", fleet.counters_prefix(name)), text, self.lease).await?;
            self.published.insert(name.clone());
        }
        let ended: Vec<String> = self.published.difference(&running).cloned().collect();
        for name in ended {
            client.delete(&format!("{}{me}", fleet.counters_prefix(&name))).await?;
            self.published.remove(&name);
        }
        Ok(())
    }

    /// A pause of the rollout `r` of `name` as the fleet's traffic judges it now: `None` at
    /// the window's start (its baseline taken).
    pub(super) async fn judged<M: Maps + Send + 'static, S: Store>(
        &mut self,
        fleet: &Fleet,
        engine: &Handle<M>,
        client: &mut S,
        name: &str,
        r: &FleetRollout,
    ) -> Result<Option<Judged>, String> {
        let (n, from, to) = (name.to_owned(), r.from, r.to);
        let sample = engine.call(move |b| b.rollout_sample(&n, from, to)).await.map_err(|e| e.to_string())??;
        let me = fleet.config.node.clone();
        let mut now: BTreeMap<String, [Counters; 2]> = BTreeMap::new();
        now.insert(me.clone(), sample.counters);
        let mut stale = Vec::new();
        let at = now_ms();
        for (key, value) in client.read_prefix(&fleet.counters_prefix(name)).await? {
            let Ok(c) = serde_json::from_slice::<NodeCounters>(&value) else {
                tracing::warn!(key, "counters that are not switcher's; left out of the judgement");
                continue;
            };
            if c.node == me {
                continue;
            }
            let age = at.saturating_sub(c.at_unix_ms);
            if age > STALE_MS {
                stale.push((c.node, age));
            } else {
                now.insert(c.node.clone(), [of(&c, from), of(&c, to)]);
            }
        }
        let d = self.driving.entry(name.to_owned()).or_insert_with(|| Drive::new(r));
        let Some(base) = d.baseline.as_mut() else {
            d.baseline = Some(now);
            return Ok(None);
        };
        let windows = windows(base, &now);
        let counted: Vec<&String> = now.keys().collect();
        Ok(Some(Judged {
            windows,
            to_healthy: sample.to_healthy,
            replies_seen: sample.replies_seen,
            thresholds: sample.thresholds,
            from: described(&counted, &stale),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::{super::tests::*, *};

    fn c(flows: u64, replies: u64) -> Counters {
        Counters { flows, reply_packets: replies, packets: flows * 2, ..Counters::default() }
    }

    #[test]
    fn counters_sum_field_by_field() {
        let a = Counters {
            packets: 1,
            bytes: 2,
            reply_packets: 3,
            reply_bytes: 4,
            flows: 5,
            rescued: 6,
            syns: 7,
            handshakes: 8,
            refused: 9,
            backend_resets: 10,
            icmp_unreachables: 11,
            syn_retransmits: 12,
            client_resets: 13,
            evicted: 19,
            syn_latency: [14, 15, 16, 17, 18],
        };
        let s = Counters::sum([&a, &a, &Counters::default()]);
        assert_eq!(
            s,
            Counters {
                packets: 2,
                bytes: 4,
                reply_packets: 6,
                reply_bytes: 8,
                flows: 10,
                rescued: 12,
                syns: 14,
                handshakes: 16,
                refused: 18,
                backend_resets: 20,
                icmp_unreachables: 22,
                syn_retransmits: 24,
                client_resets: 26,
                evicted: 38,
                syn_latency: [28, 30, 32, 34, 36],
            }
        );
        assert_eq!(Counters::sum([]), Counters::default());
    }

    #[test]
    fn a_window_sums_the_nodes_counted_from_their_first_reading() {
        let node = |n: &str, from: Counters, to: Counters| (n.to_owned(), [from, to]);
        let mut base = BTreeMap::from([node("lb0", c(100, 500), c(0, 0)), node("lb1", c(50, 200), c(0, 0))]);
        // lb2 appears, lb1 restarted (its counters went back).
        let now = BTreeMap::from([
            node("lb0", c(130, 620), c(10, 40)),
            node("lb1", c(5, 20), c(2, 8)),
            node("lb2", c(7, 7), c(7, 7)),
        ]);
        let [old, new] = windows(&mut base, &now);
        assert_eq!((old.flows, old.replies, new.flows, new.replies), (30, 120, 10, 40));
        let later = BTreeMap::from([node("lb1", c(15, 60), c(12, 48)), node("lb2", c(17, 47), c(17, 37))]);
        let [old, new] = windows(&mut base, &later);
        assert_eq!((old.flows, new.flows), (10 + 10, 10 + 10), "lb0 left out: only lb1 and lb2 count");
        assert_eq!(
            described(&[&"lb1".to_owned()], &[("lb0".into(), 7_400)]),
            "1 node (lb1); left out: lb0, counters 7s old"
        );
    }

    #[tokio::test]
    async fn nodes_publish_their_counters_only_while_a_rollout_runs_and_the_driver_sums_them() {
        let engine = Handle::start(crate::engine::tests::board()).expect("engine");
        let f = fleet();
        let mut store = FakeStore::default();
        let mut d = Driver::new(7);
        // No rollout: nothing written.
        d.publish_counters(&f, &engine, &mut store).await.expect("publish");
        assert_eq!(store.revision, 0, "an idle fleet writes nothing");
        let r = rollout(&["10%", "pause 60s", "100%"]);
        f.lock().rollouts.records.insert("web".into(), (r.clone(), 1));
        let _ = engine.call(|b| crate::engine::tests::count(b, Colour::Green, c(3, 9))).await;
        d.publish_counters(&f, &engine, &mut store).await.expect("publish");
        let (value, _, lease) = store.kvs["/sw/counters/web/lb1"].clone();
        let mine: NodeCounters = serde_json::from_str(&value).expect("counters");
        assert_eq!((mine.node.as_str(), mine.green.flows, lease), ("lb1", 3, 7), "under this node's lease");

        // The driver (lb1): its own counters, lb0's fresh ones, lb2's stale ones left out.
        let other = |node: &str, age_ms: u64, flows: u64| {
            let n = NodeCounters {
                node: node.into(),
                at_unix_ms: now_ms() - age_ms,
                blue: c(flows, flows * 4),
                green: c(flows, flows * 4),
            };
            serde_json::to_string(&n).expect("json")
        };
        store.put("/sw/counters/web/lb0", other("lb0", 100, 100));
        store.put("/sw/counters/web/lb2", other("lb2", 9_000, 100));
        let first = d.judged(&f, &engine, &mut store, "web", &r).await.expect("judged");
        assert!(first.is_none(), "the window's start");
        store.put("/sw/counters/web/lb0", other("lb0", 0, 130));
        let _ = engine.call(|b| crate::engine::tests::count(b, Colour::Green, c(8, 29))).await;
        let j = d.judged(&f, &engine, &mut store, "web", &r).await.expect("judged").expect("a window");
        assert_eq!((j.windows[1].flows, j.windows[1].replies), (30 + 5, 120 + 20), "lb0's and lb1's");
        assert_eq!((j.windows[0].flows, j.windows[0].replies), (30, 120));
        assert!(j.from.starts_with("2 nodes (lb0, lb1); left out: lb2, counters 9s old"), "{}", j.from);

        // The rollout ends: the key goes, once; then nothing more.
        f.lock().rollouts.records.insert("web".into(), (FleetRollout { state: "complete".into(), ..r }, 2));
        d.publish_counters(&f, &engine, &mut store).await.expect("publish");
        assert!(!store.kvs.contains_key("/sw/counters/web/lb1"));
        let rev = store.revision;
        d.publish_counters(&f, &engine, &mut store).await.expect("publish");
        assert_eq!(store.revision, rev);
    }
}
