//! An in-process store, for tests and single-process services.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::clock::{self, Clock, SystemClock};
use crate::store::{Claim, Lease, Store, lease_lost, new_owner};
use crate::{Error, Fingerprint, RecordKey};

/// A store kept in this process's memory.
///
/// Records vanish with the process, so it only deduplicates deliveries that reach the same
/// process; use a database store when several instances consume the same messages or when a
/// restart must not forget completed keys. Call [`Store::purge_expired`] from time to time to
/// free the memory of expired records.
///
/// ```
/// use idem_runtime::MemoryStore;
///
/// let store = MemoryStore::new();
/// # let _ = store;
/// ```
#[derive(Debug)]
pub struct MemoryStore {
    records: Mutex<HashMap<RecordKey, Record>>,
    clock: Arc<dyn Clock>,
}

#[derive(Debug)]
struct Record {
    completed: bool,
    owner: String,
    fence: u64,
    lease_until: i64,
    expires_at: i64,
    fingerprint: Option<Fingerprint>,
    result: Vec<u8>,
}

impl Record {
    fn is_live(&self, now: i64) -> bool {
        if self.completed {
            self.expires_at > now
        } else {
            self.lease_until > now
        }
    }

    fn is_held_by(&self, lease: &Lease) -> bool {
        !self.completed && self.fence == lease.fence() && self.owner == lease.owner()
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store on the system clock.
    pub fn new() -> Self {
        Self::with_clock(SystemClock)
    }

    /// An empty store on `clock` (a [`ManualClock`](crate::clock::ManualClock) in tests).
    pub fn with_clock(clock: impl Clock) -> Self {
        Self {
            records: Mutex::new(HashMap::new()),
            clock: Arc::new(clock),
        }
    }

    /// How many records the store holds, expired ones included.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether the store holds no record.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<RecordKey, Record>> {
        // A panic while the lock was held cannot leave a record half-written: every change
        // below is a single assignment of whole fields, so the map is still consistent.
        self.records.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn claim_now(
        &self,
        key: &RecordKey,
        fingerprint: Option<&Fingerprint>,
        lease: Duration,
    ) -> Claim {
        let now = self.clock.now_millis();
        let until = clock::deadline(now, lease);
        let mut records = self.lock();
        let fence = match records.get(key) {
            Some(record) if record.is_live(now) => {
                if let (Some(stored), Some(given)) = (&record.fingerprint, fingerprint)
                    && stored != given
                {
                    return Claim::Mismatch;
                }
                return if record.completed {
                    Claim::Completed(record.result.clone())
                } else {
                    Claim::InProgress {
                        retry_after: clock::remaining(now, record.lease_until),
                    }
                };
            }
            Some(record) => record.fence.saturating_add(1),
            None => 1,
        };
        let owner = new_owner();
        records.insert(
            key.clone(),
            Record {
                completed: false,
                owner: owner.clone(),
                fence,
                lease_until: until,
                expires_at: until,
                fingerprint: fingerprint.copied(),
                result: Vec::new(),
            },
        );
        Claim::Acquired(Lease::new(owner, fence, until))
    }

    fn update_held(
        &self,
        key: &RecordKey,
        lease: &Lease,
        change: impl FnOnce(&mut Record, i64),
    ) -> Result<(), Error> {
        let now = self.clock.now_millis();
        let mut records = self.lock();
        match records.get_mut(key) {
            Some(record) if record.is_held_by(lease) => {
                change(record, now);
                Ok(())
            }
            _ => Err(lease_lost(key, lease)),
        }
    }
}

impl Store for MemoryStore {
    async fn claim(
        &self,
        key: &RecordKey,
        fingerprint: Option<&Fingerprint>,
        lease: Duration,
    ) -> Result<Claim, Error> {
        Ok(self.claim_now(key, fingerprint, lease))
    }

    async fn complete(
        &self,
        key: &RecordKey,
        lease: &Lease,
        result: &[u8],
        ttl: Duration,
    ) -> Result<(), Error> {
        self.update_held(key, lease, |record, now| {
            record.completed = true;
            record.result = result.to_vec();
            record.expires_at = clock::deadline(now, ttl);
        })
    }

    async fn release(&self, key: &RecordKey, lease: &Lease) -> Result<(), Error> {
        self.update_held(key, lease, |record, now| {
            record.lease_until = now;
            record.expires_at = now;
        })
    }

    async fn extend(
        &self,
        key: &RecordKey,
        lease: &Lease,
        duration: Duration,
    ) -> Result<Lease, Error> {
        let mut extended = None;
        self.update_held(key, lease, |record, now| {
            record.lease_until = clock::deadline(now, duration);
            record.expires_at = record.lease_until;
            extended = Some(record.lease_until);
        })?;
        let until = extended.unwrap_or(lease.until_millis());
        Ok(Lease::new(lease.owner().to_owned(), lease.fence(), until))
    }

    async fn purge_expired(&self, limit: u32) -> Result<u64, Error> {
        let now = self.clock.now_millis();
        let mut records = self.lock();
        let expired: Vec<RecordKey> = records
            .iter()
            .filter(|(_, record)| record.expires_at <= now)
            .map(|(key, _)| key.clone())
            .take(limit as usize)
            .collect();
        for key in &expired {
            records.remove(key);
        }
        Ok(expired.len() as u64)
    }
}
