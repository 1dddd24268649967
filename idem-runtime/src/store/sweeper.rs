//! A background task that purges expired records.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::Store;

/// Purges a store's expired records every `every`, in batches of `batch`, until stopped or
/// dropped.
///
/// Each round calls [`Store::purge_expired`] until a batch comes back smaller than `batch`, so
/// a backlog is worked off in bounded statements without holding locks for long. Errors are
/// logged (`tracing` warning) and the next round tries again. Needs a tokio runtime.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use std::sync::Arc;
/// use std::time::Duration;
/// use idem_runtime::{MemoryStore, Sweeper};
///
/// let store = Arc::new(MemoryStore::new());
/// let sweeper = Sweeper::spawn(store.clone(), Duration::from_secs(60), 1_000);
/// // … handle messages …
/// sweeper.stop().await;
/// # }
/// ```
#[derive(Debug)]
pub struct Sweeper {
    task: JoinHandle<()>,
}

impl Sweeper {
    /// Starts sweeping `store` on the current tokio runtime.
    pub fn spawn<S: Store + 'static>(store: Arc<S>, every: Duration, batch: u32) -> Self {
        let batch = batch.max(1);
        let task = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every.max(Duration::from_millis(1)));
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                sweep(&*store, batch).await;
            }
        });
        Self { task }
    }

    /// Stops sweeping and waits for the task to end (a batch in flight is abandoned; the
    /// records it did not delete are deleted by the next sweep).
    pub async fn stop(mut self) {
        self.task.abort();
        // The task ends cancelled (or had ended by panicking, which was reported then).
        let _ = (&mut self.task).await;
    }
}

impl Drop for Sweeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One round: purge batches until one comes back short. Returns how many records went.
async fn sweep<S: Store + ?Sized>(store: &S, batch: u32) -> u64 {
    let mut purged = 0;
    loop {
        match store.purge_expired(batch).await {
            Ok(deleted) => {
                purged += deleted;
                if deleted < u64::from(batch) {
                    if purged > 0 {
                        tracing::debug!(purged, "purged expired idempotency records");
                    }
                    return purged;
                }
                tokio::task::yield_now().await;
            }
            Err(error) => {
                tracing::warn!(%error, "could not purge expired idempotency records; retrying on the next round");
                return purged;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::{Claim, MemoryStore, RecordKey};

    #[tokio::test]
    async fn works_off_a_backlog_in_batches_and_keeps_live_records() {
        let clock = ManualClock::new(1_700_000_000_000);
        let store = Arc::new(MemoryStore::with_clock(clock.clone()));
        for i in 0..25 {
            let key = RecordKey::new("s", &format!("old-{i}")).unwrap();
            let claimed = store.claim(&key, None, Duration::from_secs(1)).await;
            assert!(matches!(claimed, Ok(Claim::Acquired(_))));
        }
        clock.advance(Duration::from_secs(2));
        let live = RecordKey::new("s", "live").unwrap();
        let claimed = store.claim(&live, None, Duration::from_secs(60)).await;
        assert!(matches!(claimed, Ok(Claim::Acquired(_))));

        assert_eq!(sweep(&*store, 10).await, 25);
        assert_eq!(store.len(), 1);
        assert_eq!(sweep(&*store, 10).await, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_background_task_sweeps_until_stopped() {
        let clock = ManualClock::new(1_700_000_000_000);
        let store = Arc::new(MemoryStore::with_clock(clock.clone()));
        let sweeper = Sweeper::spawn(store.clone(), Duration::from_secs(60), 100);
        let key = RecordKey::new("s", "k").unwrap();
        let claimed = store.claim(&key, None, Duration::from_secs(1)).await;
        assert!(matches!(claimed, Ok(Claim::Acquired(_))));
        clock.advance(Duration::from_secs(2));
        tokio::time::sleep(Duration::from_secs(61)).await;
        assert!(
            store.is_empty(),
            "the second round purged the expired record"
        );
        sweeper.stop().await;

        let claimed = store.claim(&key, None, Duration::from_secs(1)).await;
        assert!(matches!(claimed, Ok(Claim::Acquired(_))));
        clock.advance(Duration::from_secs(2));
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(store.len(), 1, "a stopped sweeper purges nothing");
    }
}
