//! Health checks: each checked service's backends probed at its interval, concurrently, off
//! the engine; the results recorded through it (which may roll back or fail over).

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::task::JoinSet;

use super::{Engine, audit::Audit};
use crate::{engine::Change, fleet::Fleet, health};

/// Probes every checked service's backends at its interval and records the results.
pub(super) async fn check_health(engine: Engine, audit: Arc<Audit>, fleet: Option<Arc<Fleet>>) {
    let mut due: HashMap<String, Instant> = HashMap::new();
    loop {
        for c in health_round(&engine, &audit, &mut due).await {
            if let Some(f) = &fleet {
                f.note_override(&c.service, format!("{} {} → {} by this node's health checks", c.what, c.from, c.to));
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Probes the services that are due, concurrently, and records the results; returns the
/// switches the results caused (automatic rollback, failover). A probe that could not run here
/// (see [`health::Failure::Local`]) is left out: its backend keeps its state.
pub(super) async fn health_round(engine: &Engine, audit: &Audit, due: &mut HashMap<String, Instant>) -> Vec<Change> {
    let mut switches = Vec::new();
    let checks = engine.call(|b| b.checks()).await.unwrap_or_default();
    let now = Instant::now();
    let mut round = JoinSet::new();
    for (name, check, backends) in checks {
        if due.get(&name).is_some_and(|t| *t > now) {
            continue;
        }
        due.insert(name.clone(), now + check.interval);
        round.spawn(async move {
            let probes = backends.into_iter().map(|b| {
                let check = check.clone();
                (b, async move { health::probe(&check, b).await })
            });
            (name, join_keyed(probes).await)
        });
    }
    while let Some(joined) = round.join_next().await {
        let Ok((name, results)) = joined else {
            tracing::error!("a round of health checks failed: {joined:?}");
            continue;
        };
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
        let changes = engine.call(move |b| b.record_health(&name, counted)).await.unwrap_or_default();
        for c in changes {
            audit.record("switcher (health checks)", &c);
            if c.what == "auto-rollback" || c.what == "failover" {
                switches.push(c);
            }
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
