//! `switcher flows` in the daemon, and the flow table's pressure in its log.
//!
//! A listing walks `FLOWS` on a descriptor of its own, on a blocking task (see
//! [`crate::flowlist`]): the engine's owner is asked only for the services' names (one quick
//! job), so a walk never holds up cut-overs, status, the fleet or other connections, and the
//! data path is only read. One walk runs at a time; a second waits for it within its deadline.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::Semaphore;

use super::Engine;
use crate::{
    flowlist::{self, Filter, Names, Walk},
    flowtable::FlowTable,
    protocol::{
        Deadline, FlowQuery, FlowSource, Response,
        flows::{FLOW_TABLE_WARN_BP, fill_bp, flow_table_warning},
    },
};

/// Walks of the flow table for `switcher flows` at once.
const WALKS: usize = 1;
/// Time kept from the client's deadline to send the answer back.
const ANSWER_MARGIN: Duration = Duration::from_millis(500);

/// What the daemon lists flows with.
pub(super) struct Lister {
    table: Arc<FlowTable>,
    /// The flows `FLOWS` is made for.
    pub capacity: u64,
    udp_idle: Duration,
    walks: Arc<Semaphore>,
}

impl Lister {
    pub(super) fn new(table: Arc<FlowTable>, capacity: u64, udp_idle: Duration) -> Lister {
        Lister { table, capacity, udp_idle, walks: Arc::new(Semaphore::new(WALKS)) }
    }
}

/// Answers `switcher flows`: names from the engine, then a walk on a blocking task, bounded
/// by the query's limit, [`flowlist::DEADLINE`] and the client's deadline.
pub(super) async fn answer(engine: &Engine, lister: &Lister, query: FlowQuery, deadline: Option<Deadline>) -> Response {
    let names = match engine.call(|b| b.service_ids()).await {
        Ok(ids) => Names::new(ids),
        Err(e) => return Response::error(e.to_string()),
    };
    let filter = match Filter::new(&query, &names) {
        Ok(f) => f,
        Err(e) => return Response::error(e.to_string()),
    };
    let budget = deadline.map_or(flowlist::DEADLINE, |d| d.remaining().saturating_sub(ANSWER_MARGIN));
    let until = Instant::now() + budget.min(flowlist::DEADLINE);
    let Ok(Ok(permit)) = tokio::time::timeout_at(until.into(), Arc::clone(&lister.walks).acquire_owned()).await else {
        return Response::error(
            "another listing of the flows took the time this one had; try again (or narrow it: SERVICE, --colour, --backend, --client, --limit)",
        );
    };
    let walk = Walk {
        udp_idle: lister.udp_idle,
        capacity: Some(lister.capacity),
        deadline: until,
        source: FlowSource::Daemon,
    };
    let table = Arc::clone(&lister.table);
    let walked = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        flowlist::list(&table, &filter, &names, walk)
    })
    .await;
    match walked {
        Ok(listing) => Response { ok: true, flows: Some(listing), ..Response::default() },
        Err(e) => Response::error(format!("the walk of the flow table failed: {e}")),
    }
}

/// Below this fill (basis points) a warned pressure is over: some room under the warning, so
/// a table hovering at the line does not flap in the log.
const CALM_BP: u32 = FLOW_TABLE_WARN_BP - 500;
/// How often the warning is repeated while the table stays full.
const REPEAT: Duration = Duration::from_secs(60);

/// What the log says about the flow table's fill, from one reading to the next.
#[derive(Debug, Default)]
pub(super) struct Pressure {
    warned_at: Option<Instant>,
}

/// A line for the log.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Note {
    Warn(String),
    Calm(String),
}

impl Pressure {
    /// Takes a reading: `open` flows of `capacity`, at `now`.
    pub(super) fn read(&mut self, open: u64, capacity: u64, now: Instant) -> Option<Note> {
        let bp = fill_bp(open, capacity);
        match (flow_table_warning(open, capacity), self.warned_at) {
            (Some(w), None) => {
                self.warned_at = Some(now);
                Some(Note::Warn(w))
            }
            (Some(w), Some(t)) if now.duration_since(t) >= REPEAT => {
                self.warned_at = Some(now);
                Some(Note::Warn(w))
            }
            (None, Some(_)) if bp < CALM_BP => {
                self.warned_at = None;
                Some(Note::Calm(format!(
                    "the flow table is back to {} full ({open} open flows of max_flows = {capacity})",
                    crate::protocol::percent(bp)
                )))
            }
            _ => None,
        }
    }
}

/// Reads the last count of the flows every few seconds and warns in the log while the flow
/// table is near full (see [`Pressure`]).
pub(super) async fn watch_pressure(engine: Engine, capacity: u64) {
    let mut pressure = Pressure::default();
    let mut every = tokio::time::interval(Duration::from_secs(5));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Ok(Some(open)) = engine
            .call(|b| b.maps_mut().flow_counts().map(|s| s.counts.values().map(|c| c.live + c.closing + c.idle).sum()))
            .await
        else {
            continue;
        };
        match pressure.read(open, capacity, Instant::now()) {
            Some(Note::Warn(w)) => tracing::warn!(open, capacity, "{w}"),
            Some(Note::Calm(m)) => tracing::info!(open, capacity, "{m}"),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_warns_when_the_table_fills_repeats_and_says_when_it_is_over() {
        let mut p = Pressure::default();
        let t0 = Instant::now();
        assert_eq!(p.read(849, 1000, t0), None);
        assert!(matches!(p.read(850, 1000, t0), Some(Note::Warn(w)) if w.contains("85% full")));
        assert_eq!(p.read(900, 1000, t0 + Duration::from_secs(5)), None, "not again at once");
        assert!(matches!(p.read(900, 1000, t0 + REPEAT), Some(Note::Warn(_))), "again a minute later");
        assert_eq!(p.read(820, 1000, t0 + REPEAT * 2), None, "just under the line: not over yet");
        assert!(matches!(p.read(700, 1000, t0 + REPEAT * 2), Some(Note::Calm(m)) if m.contains("70% full")));
        assert_eq!(p.read(700, 1000, t0 + REPEAT * 3), None);
        assert!(matches!(p.read(990, 1000, t0 + REPEAT * 3), Some(Note::Warn(_))), "a new episode warns at once");
    }
}
