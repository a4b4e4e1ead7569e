//! The engine's one owner. A thread of its own holds the [`Switchboard`] (and through it the
//! data plane's map handles); everyone else — control connections, the fleet, health checks,
//! metrics, the once-a-second tick — sends it a job over a tokio mpsc channel and awaits the
//! answer on a oneshot, as bpfman's and mini-redis's servers do. No lock is shared: jobs run
//! one at a time, in the order they arrive, and the map syscalls they make run on that
//! thread, never on an async worker. A request waits only for the jobs queued before it.

use std::panic::AssertUnwindSafe;

use tokio::sync::{mpsc, oneshot};

use super::{Maps, Switchboard};

/// Jobs waiting for the owner at most; senders wait for room beyond it.
const QUEUE: usize = 256;

type Job<M> = Box<dyn FnOnce(&mut Switchboard<M>) + Send>;

/// The owner stopped taking jobs: one of them panicked (its state may be half-changed), or
/// the daemon is stopping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the daemon's state is unusable (a request failed inside it); restart the daemon")]
pub struct Stopped;

/// Where jobs for the engine go: cheap to clone, one per task that needs the engine.
pub struct Handle<M> {
    jobs: mpsc::Sender<Job<M>>,
}

impl<M> Clone for Handle<M> {
    fn clone(&self) -> Self {
        Handle { jobs: self.jobs.clone() }
    }
}

impl<M: Maps + Send + 'static> Handle<M> {
    /// Hands `board` to a new thread, its one owner, until every handle is dropped.
    ///
    /// # Errors
    /// The thread could not be started.
    pub fn start(board: Switchboard<M>) -> std::io::Result<Handle<M>> {
        let (jobs, mut queue) = mpsc::channel::<Job<M>>(QUEUE);
        std::thread::Builder::new().name("engine".into()).spawn(move || {
            let mut board = board;
            let mut broken = false;
            while let Some(job) = queue.blocking_recv() {
                // After a panic the state may be half-changed: later jobs are dropped unrun,
                // and their callers get `Stopped` (as a poisoned lock would refuse them).
                if broken {
                    continue;
                }
                if std::panic::catch_unwind(AssertUnwindSafe(|| job(&mut board))).is_err() {
                    tracing::error!("a request panicked inside the engine; it refuses every request from now on: restart the daemon (the data path keeps running)");
                    broken = true;
                }
            }
        })?;
        Ok(Handle { jobs })
    }

    /// Runs `job` on the engine and returns its answer.
    ///
    /// # Errors
    /// [`Stopped`]: the owner no longer takes jobs.
    pub async fn call<R: Send + 'static>(
        &self,
        job: impl FnOnce(&mut Switchboard<M>) -> R + Send + 'static,
    ) -> Result<R, Stopped> {
        let (reply, answer) = oneshot::channel();
        let job: Job<M> = Box::new(move |board| {
            // The caller may have gone (a client that stopped waiting): nothing to do then.
            let _ = reply.send(job(board));
        });
        self.jobs.send(job).await.map_err(|_| Stopped)?;
        answer.await.map_err(|_| Stopped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_in_order_on_one_owner_and_a_panic_stops_it() {
        let engine = Handle::start(crate::engine::tests::board()).expect("start");
        let first = engine.call(|b| b.services().len()).await;
        assert_eq!(first, Ok(2));
        let thread = engine.call(|_| std::thread::current().name().map(str::to_owned)).await;
        assert_eq!(thread, Ok(Some("engine".to_owned())), "jobs run on the owner's thread");
        let clone = engine.clone();
        let (a, b) = tokio::join!(engine.call(|b| b.services()[0].name.clone()), clone.call(|b| b.draining()));
        assert_eq!((a, b), (Ok("web".to_owned()), Ok(false)));
        let panicked = engine.call(|_| -> u32 { panic!("a bug in a request") }).await;
        assert_eq!(panicked, Err(Stopped));
        assert_eq!(engine.call(|b| b.services().len()).await, Err(Stopped), "refused after a panic");
    }
}
