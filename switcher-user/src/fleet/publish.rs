//! What a node publishes about itself, and when: at once when what it applied, its
//! overrides, health or drains change; its flow counts only when they moved enough, at most
//! once per `COUNTS_GAP`; never for the time alone (the lease says the node is alive).

use std::time::Instant;

use etcd_client::{Client, PutOptions};

use super::{COUNTS_GAP, Fleet, etcd_error};
use crate::{
    engine::{Handle, Maps},
    protocol::{NodeService, NodeState},
};

/// Publishes this node's state under its lease when it changed (see [`news`]).
pub(super) struct Publisher {
    pub lease: i64,
    /// What it published last in this session, and when.
    pub last: Option<(NodeState, Instant)>,
}

impl Publisher {
    /// Publishes what changed; flow counts only when `counts` (the periodic check) and not
    /// within [`COUNTS_GAP`] of the last publication.
    pub async fn publish<M: Maps + Send + 'static>(
        &mut self,
        fleet: &Fleet,
        engine: &Handle<M>,
        client: &mut Client,
        counts: bool,
    ) -> Result<(), String> {
        let state = fleet.node_state(engine).await;
        let due = match (&self.last, news(self.last.as_ref().map(|(s, _)| s), &state)) {
            (_, News::None) => false,
            (_, News::State) | (None, _) => true,
            (Some((_, at)), News::Counts) => counts && at.elapsed() >= COUNTS_GAP,
        };
        if !due {
            return Ok(());
        }
        let value = serde_json::to_string(&state).map_err(|e| e.to_string())?;
        let key = format!("{}{}", fleet.nodes_prefix(), fleet.config.node);
        client.put(key, value, Some(PutOptions::new().with_lease(self.lease))).await.map_err(|e| etcd_error(&e))?;
        self.last = Some((state, Instant::now()));
        Ok(())
    }
}

/// What is new in a node's state since it was last published.
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

pub(super) fn news(last: Option<&NodeState>, next: &NodeState) -> News {
    let Some(last) = last else { return News::State };
    // Everything but the time and the counts.
    let shape = |n: &NodeState| NodeState {
        at_unix: 0,
        services: n
            .services
            .iter()
            .map(|s| NodeService { live_flows: 0, draining: s.draining.map(|(c, _)| (c, 0)), ..s.clone() })
            .collect(),
        ..n.clone()
    };
    if shape(last) != shape(next) {
        return News::State;
    }
    // From `a` published to `b` now: by more than a quarter of `a`, or to or from zero.
    let moved = |a: u64, b: u64| {
        (a == 0) != (b == 0) || b.saturating_mul(4) > a.saturating_mul(5) || b.saturating_mul(4) < a.saturating_mul(3)
    };
    let counts = last.services.iter().zip(&next.services).any(|(a, b)| {
        a.draining.as_ref().map(|d| d.1) != b.draining.as_ref().map(|d| d.1) || moved(a.live_flows, b.live_flows)
    });
    if counts { News::Counts } else { News::None }
}
