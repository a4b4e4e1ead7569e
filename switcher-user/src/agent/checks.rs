//! Health checks: each checked service's backends probed at its interval, concurrently, off
//! the engine; the results recorded through it (which may roll back or fail over).
//!
//! Services are spread over their interval (each starts at an offset given by its name), so
//! 4,096 services of two backends are 820 probes every 100 ms, not 8,192 at once; at most
//! [`MAX_PROBES`] run at a time; and a service's results are recorded as soon as its round
//! ends, so a slow service (probes that wait out their timeout) never delays the others.

use std::{
    collections::{HashMap, HashSet},
    hash::{Hash, Hasher},
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{sync::Semaphore, task::JoinSet};

use super::{Engine, audit::Audit};
use crate::{config::HealthConfig, engine::Change, fleet::Fleet, health};

/// Probes in flight at once, over all services.
pub const MAX_PROBES: usize = 512;

/// How often the checker looks for services that are due.
const TICK: Duration = Duration::from_millis(100);

/// One service's round: its name and each backend's result.
type Round = (String, Vec<(SocketAddr, Joined<Result<(), health::Failure>>)>);

/// Probes every checked service's backends at its interval and records the results.
pub(super) async fn check_health(engine: Engine, audit: Arc<Audit>, fleet: Option<Arc<Fleet>>) {
    let permits = Arc::new(Semaphore::new(MAX_PROBES));
    let mut due: HashMap<String, Instant> = HashMap::new();
    let mut running: HashSet<String> = HashSet::new();
    let mut rounds: JoinSet<Round> = JoinSet::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let checks = engine.call(|b| b.checks()).await.unwrap_or_default();
                let now = Instant::now();
                // Services no longer checked are forgotten (a reload may bring them back).
                let checked: HashSet<&str> = checks.iter().map(|(n, _, _)| n.as_str()).collect();
                due.retain(|name, _| checked.contains(name.as_str()));
                drop(checked);
                for (name, check, backends) in checks {
                    if running.contains(&name) {
                        continue;
                    }
                    let at = *due.entry(name.clone()).or_insert_with(|| now + phase(&name, check.interval));
                    if at > now {
                        continue;
                    }
                    due.insert(name.clone(), now + check.interval);
                    running.insert(name.clone());
                    rounds.spawn(probe_service(name, check, backends, Arc::clone(&permits)));
                }
            }
            Some(joined) = rounds.join_next() => {
                // This round and every other that has ended meanwhile: one call to the engine.
                let ended = ended_rounds(joined, &mut rounds);
                for (name, _) in &ended {
                    running.remove(name);
                }
                for c in record(&engine, &audit, ended).await {
                    if let Some(f) = &fleet {
                        f.note_override(&c.service, format!("{} {} → {} by this node's health checks", c.what, c.from, c.to));
                    }
                }
            }
        }
    }
}

/// Where in its interval a service's probes fall: the same offset for the same name, spread
/// evenly over the interval across names.
fn phase(name: &str, interval: Duration) -> Duration {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    name.hash(&mut h);
    let span = interval.as_millis().max(1) as u64;
    Duration::from_millis(h.finish() % span)
}

/// One round of one service: every backend probed concurrently, each probe holding a permit.
async fn probe_service(name: String, check: HealthConfig, backends: Vec<SocketAddr>, permits: Arc<Semaphore>) -> Round {
    let probes = backends.into_iter().map(|b| {
        let check = check.clone();
        let permits = Arc::clone(&permits);
        (b, async move {
            // The semaphore is never closed; without a permit the probe runs anyway.
            let _permit = permits.acquire_owned().await.ok();
            health::probe(&check, b).await
        })
    });
    (name, join_keyed(probes).await)
}

/// Probes every checked service once, concurrently, and records the results (before the
/// control socket opens, so that the first cut-over is judged on facts); returns the switches
/// the results caused (automatic rollback, failover).
pub(super) async fn health_round(engine: &Engine, audit: &Audit) -> Vec<Change> {
    let permits = Arc::new(Semaphore::new(MAX_PROBES));
    let checks = engine.call(|b| b.checks()).await.unwrap_or_default();
    let mut rounds = JoinSet::new();
    for (name, check, backends) in checks {
        rounds.spawn(probe_service(name, check, backends, Arc::clone(&permits)));
    }
    let mut switches = Vec::new();
    while let Some(joined) = rounds.join_next().await {
        let ended = ended_rounds(joined, &mut rounds);
        switches.extend(record(engine, audit, ended).await);
    }
    switches
}

/// The round `first` that just ended and every other of `rounds` that has ended meanwhile,
/// to record in one call to the engine (a round that panicked is logged and left out).
fn ended_rounds(first: Result<Round, tokio::task::JoinError>, rounds: &mut JoinSet<Round>) -> Vec<Round> {
    let mut ended = Vec::new();
    let mut next = Some(first);
    while let Some(joined) = next {
        match joined {
            Ok(round) => ended.push(round),
            Err(e) => tracing::error!("a round of health checks failed: {e}"),
        }
        next = rounds.try_join_next();
    }
    ended
}

/// Records the results of the rounds that ended, in one call to the engine, and audits what
/// they changed; returns the switches among the changes (automatic rollback, failover). A
/// probe that could not run here (see [`health::Failure::Local`]) is left out: its backend
/// keeps its state.
async fn record(engine: &Engine, audit: &Audit, rounds: Vec<Round>) -> Vec<Change> {
    let mut batch = Vec::with_capacity(rounds.len());
    for (name, results) in rounds {
        let mut counted = Vec::with_capacity(results.len());
        let mut local = Vec::new();
        for (b, r) in results {
            match r {
                Ok(Ok(())) => counted.push((b, Ok(()))),
                Ok(Err(health::Failure::Backend(e))) => counted.push((b, Err(e))),
                Ok(Err(health::Failure::Local(e))) => local.push(e),
                Err(panicked) => local.push(format!("the probe of {b} failed: {panicked}")),
            }
        }
        if let Some(first) = local.first() {
            tracing::warn!(
                service = %name,
                probes = local.len(),
                "health probes could not run on this node ({first}); their backends keep their state: this is not a backend failure"
            );
        }
        batch.push((name, counted));
    }
    if batch.is_empty() {
        return Vec::new();
    }
    let changes = engine
        .call(move |b| {
            batch.into_iter().flat_map(|(name, counted)| b.record_health(&name, counted)).collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
    let mut switches = Vec::new();
    for c in changes {
        audit.record("switcher (health checks)", &c);
        if c.what == "auto-rollback" || c.what == "failover" {
            switches.push(c);
        }
    }
    switches
}

/// A task's output, or how it failed.
type Joined<T> = Result<T, String>;

/// Runs futures concurrently; returns each one's output paired with its key, in the order
/// given. A future that panicked gives `Err` with the panic, against its own key: a failed
/// task never shifts the results of the others.
async fn join_keyed<K, F>(futures: impl IntoIterator<Item = (K, F)>) -> Vec<(K, Joined<F::Output>)>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let mut set = JoinSet::new();
    let mut slots: Vec<(K, Option<Joined<F::Output>>)> = Vec::new();
    let mut index = HashMap::new();
    for (i, (k, f)) in futures.into_iter().enumerate() {
        let handle = set.spawn(f);
        index.insert(handle.id(), i);
        slots.push((k, None));
    }
    while let Some(joined) = set.join_next_with_id().await {
        let (id, out) = match joined {
            Ok((id, out)) => (id, Ok(out)),
            Err(e) => (e.id(), Err(if e.is_panic() { "it panicked".to_owned() } else { e.to_string() })),
        };
        if let Some(slot) = index.get(&id).and_then(|&i| slots.get_mut(i)) {
            slot.1 = Some(out);
        }
    }
    slots.into_iter().map(|(k, r)| (k, r.unwrap_or_else(|| Err("it did not finish".to_owned())))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_are_spread_over_their_interval() {
        let interval = Duration::from_secs(1);
        let mut tenths = [0u32; 10];
        for i in 0..4_096 {
            let p = phase(&format!("s{i}"), interval);
            assert!(p < interval, "{p:?}");
            assert_eq!(p, phase(&format!("s{i}"), interval), "the same name, the same phase");
            tenths[(p.as_millis() / 100) as usize] += 1;
        }
        // 410 a tenth if even: no tenth may hold twice that.
        assert!(tenths.iter().all(|&n| (200..820).contains(&n)), "{tenths:?}");
    }

    #[tokio::test]
    async fn a_panicking_probe_does_not_shift_the_others_results() {
        let futures = ["a", "b", "c", "d"].into_iter().enumerate().map(|(i, k)| {
            (k, async move {
                tokio::task::yield_now().await;
                assert!(k != "b", "probe of b panics");
                i
            })
        });
        let out = join_keyed(futures).await;
        assert_eq!(out.len(), 4);
        assert_eq!(out[0], ("a", Ok(0)));
        assert!(matches!(&out[1], ("b", Err(e)) if e.contains("panicked")), "{:?}", out[1]);
        assert_eq!(out[2], ("c", Ok(2)));
        assert_eq!(out[3], ("d", Ok(3)));
    }
}
