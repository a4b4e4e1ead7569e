//! A node's session with etcd: connect, seed what etcd lacks, read and watch the desired
//! states, apply them through the engine, publish what this node does, keep its lease, read
//! the other nodes' drains, and compact; reconnect with back-off when etcd goes away.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, KeyValue, Txn, TxnOp, WatchFilterType, WatchOptions,
};

use super::{
    CHECK_EVERY, DRAINS_EVERY, FLOWS_EVERY, Fleet, compact::Compactor, etcd_error, parse_desired, plan::seed,
    publish::Publisher, rollout::Driver,
};
use crate::{
    engine::{Change, Handle, Maps, RemoteDrains},
    protocol::{Colour, Desired, NodeState},
};

/// Runs the node's side of the fleet until aborted: connect, seed, read, watch, publish;
/// reconnect with back-off when etcd goes away.
pub async fn run<M: Maps + Send + 'static>(
    fleet: Arc<Fleet>,
    engine: Handle<M>,
    record: impl Fn(&str, &Change) + Send + Sync + 'static,
) {
    // In a fleet, a drain ends only when no node holds flows of the draining colour: the
    // switchboard waits for a view of the other nodes taken after each drain began.
    let _ = engine.call(|b| b.set_remote_drains(HashMap::new())).await;
    let mut backoff = Duration::from_millis(500);
    loop {
        let started = Instant::now();
        let e = session(&fleet, &engine, &record).await;
        fleet.set_connected(None, Some(e));
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(500);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(4));
    }
}

/// One connection to etcd, until it fails; returns why.
async fn session<M: Maps + Send + 'static>(
    fleet: &Fleet,
    engine: &Handle<M>,
    record: &impl Fn(&str, &Change),
) -> String {
    match session_inner(fleet, engine, record).await {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

async fn session_inner<M: Maps + Send + 'static>(
    fleet: &Fleet,
    engine: &Handle<M>,
    record: &impl Fn(&str, &Change),
) -> Result<std::convert::Infallible, String> {
    let e = |e: etcd_client::Error| etcd_error(&e);
    let opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(3))
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
        .with_keep_alive_while_idle(true);
    let mut client = Client::connect(&fleet.config.endpoints, Some(opts)).await.map_err(e)?;
    let all = read_desired(fleet, engine, &mut client).await?;
    let revision = all.header().map_or(0, etcd_client::ResponseHeader::revision);
    let ttl = i64::try_from(fleet.config.lease_ttl.as_secs()).unwrap_or(10);
    let lease = client.lease_grant(ttl, None).await.map_err(e)?.id();
    let (mut keeper, mut keepalive) = client.lease_keep_alive(lease).await.map_err(e)?;
    let mut watch = client
        .watch(fleet.services_prefix(), Some(WatchOptions::new().with_prefix().with_start_revision(revision + 1)))
        .await
        .map_err(e)?;
    // This node's own key: published only on change, so if it goes (deleted by hand, a lease
    // revoked), it is written again at once rather than at the next change.
    let own_key = format!("{}{}", fleet.nodes_prefix(), fleet.config.node);
    let mut own = client
        .watch(
            own_key,
            Some(WatchOptions::new().with_start_revision(revision + 1).with_filters([WatchFilterType::NoPut])),
        )
        .await
        .map_err(e)?;
    // The fleet's rollouts: read, then watched; one node drives each (see `rollout`).
    let rollouts_at = fleet.load_rollouts(&mut client).await?;
    let mut rollouts = client
        .watch(fleet.rollouts_prefix(), Some(WatchOptions::new().with_prefix().with_start_revision(rollouts_at + 1)))
        .await
        .map_err(e)?;
    let mut driver = Driver::new(lease);
    let mut drive = tokio::time::interval(Duration::from_secs(1));
    drive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    fleet.set_connected(Some(client.clone()), None);
    apply_kvs(fleet, engine, record, all.kvs()).await;
    let mut publisher = Publisher { lease, last: None };
    publisher.publish(fleet, engine, &mut client, false).await?;
    let mut renew = tokio::time::interval(fleet.config.lease_ttl / 3);
    let mut check = tokio::time::interval(CHECK_EVERY);
    let mut flows_counted = Instant::now();
    // When the other nodes' drains may be read next.
    let mut drains_next = Instant::now();
    // Never fires without compaction (a day is as good as never: `interval` needs a period).
    let every = fleet.config.compaction_interval.unwrap_or(Duration::from_secs(86_400));
    let mut compact = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let mut compactor = Compactor::default();
    loop {
        tokio::select! {
            msg = watch.message() => {
                let msg = msg.map_err(e)?.ok_or("the watch on etcd ended")?;
                if msg.canceled() {
                    return Err(format!("the watch on etcd was cancelled: {}", msg.cancel_reason()));
                }
                let puts: Vec<KeyValue> = msg
                    .events()
                    .iter()
                    .filter(|ev| ev.event_type() == etcd_client::EventType::Put)
                    .filter_map(|ev| ev.kv().cloned())
                    .collect();
                for ev in msg.events().iter().filter(|ev| ev.event_type() == etcd_client::EventType::Delete) {
                    if let Some(kv) = ev.kv() {
                        tracing::warn!(key = kv.key_str().unwrap_or("?"), "a desired state was deleted from etcd; this node keeps what it has");
                    }
                }
                apply_kvs(fleet, engine, record, &puts).await;
                publisher.publish(fleet, engine, &mut client, false).await?;
            }
            msg = own.message() => {
                let msg = msg.map_err(e)?.ok_or("the watch on etcd ended")?;
                if msg.canceled() {
                    return Err(format!("the watch on etcd was cancelled: {}", msg.cancel_reason()));
                }
                if !msg.events().is_empty() {
                    tracing::warn!("this node's published state was deleted from etcd; publishing it again");
                    publisher.last = None;
                    publisher.publish(fleet, engine, &mut client, false).await?;
                }
            }
            msg = rollouts.message() => {
                let msg = msg.map_err(e)?.ok_or("the watch on etcd ended")?;
                if msg.canceled() {
                    return Err(format!("the watch on etcd was cancelled: {}", msg.cancel_reason()));
                }
                fleet.watched_rollouts(msg.events());
            }
            _ = drive.tick() => {
                driver.publish_counters(fleet, engine, &mut client).await?;
                driver.tick(fleet, engine, &mut client, record).await?;
            }
            _ = renew.tick() => keeper.keep_alive().await.map_err(e)?,
            answer = keepalive.message() => {
                let answer = answer.map_err(e)?.ok_or("the lease keep-alive stream ended")?;
                if answer.ttl() <= 0 {
                    return Err("this node's lease expired".into());
                }
            }
            _ = check.tick() => {
                if flows_counted.elapsed() >= FLOWS_EVERY {
                    let _ = engine.call(|b| drop(b.refresh_flows())).await;
                    flows_counted = Instant::now();
                }
                let draining = engine.call(|b| b.draining()).await.unwrap_or(false);
                if draining && Instant::now() >= drains_next {
                    let drains = remote_drains(fleet, &mut client).await?;
                    // A node listed with no flows has not applied this node's revision yet.
                    let behind = drains.values().flatten().any(|(_, flows)| *flows == 0);
                    drains_next = Instant::now() + if behind { CHECK_EVERY } else { DRAINS_EVERY };
                    let _ = engine.call(move |b| b.set_remote_drains(drains)).await;
                }
                if std::mem::take(&mut fleet.lock().reseed) {
                    let all = read_desired(fleet, engine, &mut client).await?;
                    apply_kvs(fleet, engine, record, all.kvs()).await;
                }
                publisher.publish(fleet, engine, &mut client, true).await?;
            }
            () = fleet.publish.notified() => publisher.publish(fleet, engine, &mut client, false).await?,
            _ = compact.tick(), if fleet.config.compaction_interval.is_some() => {
                compactor.round(fleet, &mut client).await;
            }
        }
    }
}

/// The other nodes that still hold open flows of a draining colour, by service: a node's
/// drain ends only when no node holds any (connections that ECMP moves between nodes keep
/// their colour through the data path's drain flag meanwhile).
async fn remote_drains(fleet: &Fleet, client: &mut Client) -> Result<RemoteDrains, String> {
    let nodes =
        client.get(fleet.nodes_prefix(), Some(GetOptions::new().with_prefix())).await.map_err(|e| etcd_error(&e))?;
    let applied = fleet.lock().applied.clone();
    Ok(drains_elsewhere(
        super::publish::gather_nodes(&fleet.nodes_prefix(), super::publish::pairs(nodes.kvs())).into_iter(),
        &fleet.config.node,
        &applied,
    ))
}

/// From the nodes' published states: who, other than `me`, holds open flows of a draining
/// colour, by service, as `(node, open flows)`. A node that has not applied the revision this
/// node applied last (`applied`) may still hold flows it has not reported: it is listed with 0.
pub(super) fn drains_elsewhere(
    nodes: impl Iterator<Item = NodeState>,
    me: &str,
    applied: &HashMap<String, i64>,
) -> RemoteDrains {
    let mut out = RemoteDrains::new();
    for node in nodes.filter(|n| n.node != me) {
        for s in node.services {
            let behind = applied.get(&s.name).is_some_and(|&rev| s.applied_revision < rev);
            match s.draining.filter(|(_, n)| *n > 0) {
                Some((_, flows)) => out.entry(s.name).or_default().push((node.node.clone(), flows)),
                None if behind => out.entry(s.name).or_default().push((node.node.clone(), 0)),
                None => {}
            }
        }
    }
    for v in out.values_mut() {
        v.sort();
    }
    out
}

/// Seeds what etcd lacks, then reads every service's desired state.
async fn read_desired<M: Maps + Send + 'static>(
    fleet: &Fleet,
    engine: &Handle<M>,
    client: &mut Client,
) -> Result<etcd_client::GetResponse, String> {
    seed_missing(fleet, engine, client).await?;
    client.get(fleet.services_prefix(), Some(GetOptions::new().with_prefix())).await.map_err(|e| etcd_error(&e))
}

/// Writes the desired state of local services etcd does not have yet (only if still absent).
async fn seed_missing<M: Maps + Send + 'static>(
    fleet: &Fleet,
    engine: &Handle<M>,
    client: &mut Client,
) -> Result<(), String> {
    let (node, share) = (fleet.config.node.clone(), fleet.config.share_backends);
    // Each local service's desired state as this node has it, in one visit to the engine.
    let seeds: Vec<(String, Option<Desired>)> = engine
        .call(move |b| b.services().into_iter().map(|s| (s.name.clone(), seed(b, &s.name, &node, share))).collect())
        .await
        .unwrap_or_default();
    // What etcd has already (names only), so that a node of thousands of services seeds
    // what is missing in a few transactions instead of one round trip per service.
    let prefix = fleet.services_prefix();
    let have: std::collections::HashSet<String> = client
        .get(prefix.clone(), Some(GetOptions::new().with_prefix().with_keys_only()))
        .await
        .map_err(|e| etcd_error(&e))?
        .kvs()
        .iter()
        .filter_map(|kv| kv.key_str().ok().and_then(|k| k.strip_prefix(&prefix)).map(str::to_owned))
        .collect();
    let mut missing = Vec::new();
    for (name, seeded) in seeds {
        let Some(d) = seeded else { continue };
        if !have.contains(&name) {
            let value = serde_json::to_string(&d).map_err(|e| e.to_string())?;
            missing.push((name, d.active, value));
        }
    }
    for chunk in missing.chunks(SEED_BATCH) {
        // All of the chunk only if none of it exists yet (another node may be seeding too);
        // else key by key, each only if still absent.
        let absent = |name: &str| Compare::create_revision(fleet.service_key(name), CompareOp::Equal, 0);
        let put = |name: &str, value: &str| TxnOp::put(fleet.service_key(name), value, None);
        let all = Txn::new()
            .when(chunk.iter().map(|(n, _, _)| absent(n)).collect::<Vec<_>>())
            .and_then(chunk.iter().map(|(n, _, v)| put(n, v)).collect::<Vec<_>>());
        let seeded: Vec<&(String, Colour, String)> = if client.txn(all).await.map_err(|e| etcd_error(&e))?.succeeded() {
            chunk.iter().collect()
        } else {
            let mut one_by_one = Vec::new();
            for item in chunk {
                let txn = Txn::new().when([absent(&item.0)]).and_then([put(&item.0, &item.2)]);
                if client.txn(txn).await.map_err(|e| etcd_error(&e))?.succeeded() {
                    one_by_one.push(item);
                }
            }
            one_by_one
        };
        for (name, active, _) in seeded {
            tracing::info!(service = %name, active = %active, "seeded the fleet's desired state from this node");
        }
    }
    fleet.lock().reseed = false;
    Ok(())
}

/// Desired states seeded per transaction (etcd's default `--max-txn-ops` is 128, and a
/// seeding transaction holds one comparison and one write per service).
const SEED_BATCH: usize = 64;

async fn apply_kvs<M: Maps + Send + 'static>(
    fleet: &Fleet,
    engine: &Handle<M>,
    record: &impl Fn(&str, &Change),
    kvs: &[KeyValue],
) {
    let prefix = fleet.services_prefix();
    for kv in kvs {
        let Some(name) = kv.key_str().ok().and_then(|k| k.strip_prefix(&prefix)) else { continue };
        match parse_desired(kv) {
            Ok(d) => {
                let by = format!("fleet revision {} ({})", kv.mod_revision(), d.changed_by);
                if let Some(c) = fleet.apply(engine, name, d, kv.mod_revision()).await {
                    record(&by, &c);
                }
            }
            Err(e) => {
                tracing::warn!(service = %name, "{e}; ignored");
                fleet.lock().problems.insert(name.to_owned(), e);
            }
        }
    }
}
