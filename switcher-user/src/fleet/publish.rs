//! What a node publishes about itself, and when: at once when what it applied, its
//! overrides, health or drains change; its flow counts only when they moved enough, at most
//! once per `COUNTS_GAP`; never for the time alone (the lease says the node is alive).
//!
//! Layout: `{prefix}/nodes/{node}` holds the node's header (its name and when it first
//! published, no services), and `{prefix}/nodes/{node}/{service}` one service each, all under
//! the node's lease. A change writes only the services it concerns, so a cut-over of one of
//! 4,096 services is one small write, not the node's whole state (670 KB at 4,096). Readers
//! also take an older node's single key that lists every service.

use std::{collections::HashMap, time::Instant};

use etcd_client::{Client, KeyValue, PutOptions, Txn, TxnOp};

/// `(key, value)` of each pair, for [`gather_nodes`].
pub(super) fn pairs(kvs: &[KeyValue]) -> impl Iterator<Item = (&str, &[u8])> {
    kvs.iter().filter_map(|kv| Some((kv.key_str().ok()?, kv.value())))
}

use super::{COUNTS_GAP, Fleet, etcd_error};
use crate::{
    engine::{Handle, Maps},
    protocol::{NodeService, NodeState},
};

/// Writes per etcd transaction (etcd's default `--max-txn-ops` is 128).
const TXN_OPS: usize = 128;

/// Each service as last published, and when.
pub(super) type Published = HashMap<String, (NodeService, Instant)>;

/// Publishes this node's state under its lease when it changed (see [`news`]).
pub(super) struct Publisher {
    pub lease: i64,
    /// What it published last in this session, service by service, and when (`None`: the
    /// header is to be written again, and every service with it).
    pub last: Option<Published>,
}

impl Publisher {
    /// Publishes what changed; flow counts only when `counts` (the periodic check) and not
    /// within [`COUNTS_GAP`] of the service's last publication.
    pub async fn publish<M: Maps + Send + 'static>(
        &mut self,
        fleet: &Fleet,
        engine: &Handle<M>,
        client: &mut Client,
        counts: bool,
    ) -> Result<(), String> {
        let state = fleet.node_state(engine).await;
        let node_key = format!("{}{}", fleet.nodes_prefix(), fleet.config.node);
        let lease = || Some(PutOptions::new().with_lease(self.lease));
        let mut ops = Vec::new();
        let fresh = self.last.is_none();
        let last = self.last.get_or_insert_with(HashMap::new);
        if fresh {
            let header = NodeState { services: Vec::new(), ..state.clone() };
            let value = serde_json::to_string(&header).map_err(|e| e.to_string())?;
            ops.push(TxnOp::put(node_key.clone(), value, lease()));
        }
        let mut written = Vec::new();
        for s in &state.services {
            let due = match last.get(&s.name) {
                None => true,
                Some((before, at)) => match news(before, s) {
                    News::None => false,
                    News::State => true,
                    News::Counts => counts && at.elapsed() >= COUNTS_GAP,
                },
            };
            if due {
                let value = serde_json::to_string(s).map_err(|e| e.to_string())?;
                ops.push(TxnOp::put(format!("{node_key}/{}", s.name), value, lease()));
                written.push(s.clone());
            }
        }
        let gone: Vec<String> =
            last.keys().filter(|name| !state.services.iter().any(|s| &s.name == *name)).cloned().collect();
        for name in &gone {
            ops.push(TxnOp::delete(format!("{node_key}/{name}"), None));
        }
        for chunk in ops.chunks(TXN_OPS) {
            client.txn(Txn::new().and_then(chunk.to_vec())).await.map_err(|e| etcd_error(&e))?;
        }
        let now = Instant::now();
        for s in written {
            last.insert(s.name.clone(), (s, now));
        }
        for name in gone {
            last.remove(&name);
        }
        Ok(())
    }
}

/// The nodes' published states from the keys under `{prefix}/nodes/` (`prefix` is that
/// path, with its slash): headers with their services' keys, and older nodes' single keys.
pub(super) fn gather_nodes<'a>(prefix: &str, kvs: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Vec<NodeState> {
    let mut nodes: Vec<NodeState> = Vec::new();
    let mut services: Vec<(String, NodeService)> = Vec::new();
    for (key, value) in kvs {
        let Some(rest) = key.strip_prefix(prefix) else { continue };
        match rest.split_once('/') {
            None => {
                if let Ok(n) = serde_json::from_slice::<NodeState>(value) {
                    nodes.push(n);
                }
            }
            Some((node, _)) => {
                if let Ok(s) = serde_json::from_slice::<NodeService>(value) {
                    services.push((node.to_owned(), s));
                }
            }
        }
    }
    for (node, s) in services {
        if let Some(n) = nodes.iter_mut().find(|n| n.node == node) {
            n.services.push(s);
        }
    }
    for n in &mut nodes {
        n.services.sort_by(|a, b| a.name.cmp(&b.name));
    }
    nodes.sort_by(|a, b| a.node.cmp(&b.node));
    nodes
}

/// What is new in a service's published state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum News {
    None,
    /// Only open-flow counts: a drain's, or the active colour's by a quarter or to or from
    /// zero. Published at most once per [`COUNTS_GAP`].
    Counts,
    /// Anything else (what it applied, overrides, health, a drain beginning or ending):
    /// published at once.
    State,
}

pub(super) fn news(last: &NodeService, next: &NodeService) -> News {
    // Everything but the counts.
    let shape = |s: &NodeService| NodeService { live_flows: 0, draining: s.draining.map(|(c, _)| (c, 0)), ..s.clone() };
    if shape(last) != shape(next) {
        return News::State;
    }
    // From `a` published to `b` now: by more than a quarter of `a`, or to or from zero.
    let moved = |a: u64, b: u64| {
        (a == 0) != (b == 0) || b.saturating_mul(4) > a.saturating_mul(5) || b.saturating_mul(4) < a.saturating_mul(3)
    };
    if last.draining.as_ref().map(|d| d.1) != next.draining.as_ref().map(|d| d.1)
        || moved(last.live_flows, next.live_flows)
    {
        News::Counts
    } else {
        News::None
    }
}
