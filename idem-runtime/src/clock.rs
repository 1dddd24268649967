//! Time as the stores see it.
//!
//! Leases and record expiry are compared against a [`Clock`]. Production code uses
//! [`SystemClock`]; tests use [`ManualClock`] to move time forward without sleeping, so lease
//! expiry can be tested exactly and quickly.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A source of wall-clock time in milliseconds since the Unix epoch.
///
/// Stores that are shared between processes compare times written by different hosts, so every
/// host's clock must be kept close to the others (NTP); choose leases much longer than the
/// clock skew you allow.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_millis(&self) -> i64;
}

/// The system's wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_millis(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, duration_millis)
    }
}

/// A clock that only moves when told to; clones share the same time.
///
/// ```
/// use idem_runtime::clock::{Clock, ManualClock};
/// use std::time::Duration;
///
/// let clock = ManualClock::new(1_000);
/// clock.advance(Duration::from_secs(2));
/// assert_eq!(clock.now_millis(), 3_000);
/// ```
#[derive(Clone, Debug, Default)]
pub struct ManualClock {
    now: Arc<AtomicI64>,
}

impl ManualClock {
    /// A clock that reads `start_millis` until it is moved.
    pub fn new(start_millis: i64) -> Self {
        Self {
            now: Arc::new(AtomicI64::new(start_millis)),
        }
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        self.now.fetch_add(duration_millis(by), Ordering::SeqCst);
    }

    /// Sets the clock to `millis` since the Unix epoch.
    pub fn set(&self, millis: i64) {
        self.now.store(millis, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_millis(&self) -> i64 {
        self.now.load(Ordering::SeqCst)
    }
}

/// A duration in whole milliseconds, saturating at `i64::MAX`.
pub(crate) fn duration_millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// `now + duration`, saturating, in milliseconds.
pub(crate) fn deadline(now: i64, duration: Duration) -> i64 {
    now.saturating_add(duration_millis(duration))
}

/// The time left from `now` until `until`, zero if it has passed.
pub(crate) fn remaining(now: i64, until: i64) -> Duration {
    Duration::from_millis(u64::try_from(until.saturating_sub(now)).unwrap_or(0))
}
