//! Compaction of etcd's history, one node per interval, so that etcd never fills its quota
//! with revisions the fleet no longer needs.

use etcd_client::{Client, Compare, CompareOp, KeyValue, Txn, TxnOp, TxnOpResponse};

use super::{Fleet, etcd_error};

/// Compacts etcd's history, one node per interval: the nodes race for a compare-and-swap of
/// `{prefix}/compacted` on the version each saw last; the winner compacts to the revision it
/// saw one interval ago, so that one interval of history stays for watches that lag.
#[derive(Default)]
pub(super) struct Compactor {
    /// The version of the `compacted` key this node saw last (0: none yet).
    version: i64,
    /// etcd's revision at this node's last round (0: none yet).
    revision: i64,
}

impl Compactor {
    pub async fn round(&mut self, fleet: &Fleet, client: &mut Client) {
        match self.try_round(fleet, client).await {
            Ok(Some(rev)) => tracing::info!(revision = rev, "compacted etcd's history"),
            Ok(None) => {}
            Err(e) => tracing::warn!("compacting etcd's history: {e}; trying again in an interval"),
        }
    }

    async fn try_round(&mut self, fleet: &Fleet, client: &mut Client) -> Result<Option<i64>, String> {
        let key = format!("{}/compacted", fleet.config.prefix);
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, self.version)])
            .and_then([TxnOp::put(key.clone(), self.revision.to_string(), None)])
            .or_else([TxnOp::get(key, None)]);
        let resp = client.txn(txn).await.map_err(|e| etcd_error(&e))?;
        let now = resp.header().map_or(0, etcd_client::ResponseHeader::revision);
        let target = std::mem::replace(&mut self.revision, now);
        if !resp.succeeded() {
            // Another node won this round: follow its count.
            self.version = resp
                .op_responses()
                .into_iter()
                .find_map(|op| match op {
                    TxnOpResponse::Get(g) => g.kvs().first().map(KeyValue::version),
                    _ => None,
                })
                .unwrap_or(0);
            return Ok(None);
        }
        self.version += 1;
        if target <= 0 {
            return Ok(None);
        }
        match client.compact(target, None).await {
            Ok(_) => Ok(Some(target)),
            // Compacted further already (by etcd itself, or an operator): nothing to do.
            Err(e) if e.to_string().contains("compacted") => Ok(None),
            Err(e) => Err(etcd_error(&e)),
        }
    }
}
