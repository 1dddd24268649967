//! An in-process cache of completed results in front of any store, so hot replays skip it.
//!
//! [`CachedStore`] wraps a store. When a call of **this process** completes a key, the result
//! is kept in a bounded LRU map together with the claim's fingerprint and the record's expiry;
//! a later claim of that key that finds it there answers [`Claim::Completed`] (or
//! [`Claim::Mismatch`] for another payload) without a round trip. Everything else goes to the
//! store:
//!
//! * in-progress records are never cached (a duplicate must see the lease and its holder);
//! * a cached result is served only while its expiry is in the future, by the store's clock
//!   (the expiry is computed *before* the store computes its own, so the cache never outlives
//!   the store's record);
//! * results replayed *by the store* (completed by another process) are not cached: the store
//!   does not say when they expire;
//! * results larger than [`max_result_bytes`](CachedStore::with_max_result_bytes) are not
//!   cached, and at most [`capacity`](CachedStore::new) results are (least recently used out).
//!
//! A completed record cannot change until it expires, so a cached replay is the store's own
//! answer — unless someone deletes records by hand before their expiry: the cache does not see
//! that, and replays until the expiry it knows. Do not combine the cache with manual deletion.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), idem_runtime::Error> {
//! use std::num::NonZeroUsize;
//! use idem_runtime::cache::CachedStore;
//! use idem_runtime::{MemoryStore, Policy, RecordKey, run};
//!
//! let store = CachedStore::new(MemoryStore::new(), NonZeroUsize::new(10_000).unwrap());
//! let key = RecordKey::new("points.credit", "A-1001")?;
//! let credit = async { Ok::<_, idem_runtime::Error>(120_u64) };
//! assert_eq!(run(&store, key.clone(), None, Policy::new(), credit).await?, 120);
//! let again = async { Ok::<_, idem_runtime::Error>(0_u64) }; // not run: a replay
//! assert_eq!(run(&store, key, None, Policy::new(), again).await?, 120); // from the cache
//! assert_eq!(store.stats().hits, 1);
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use lru::LruCache;

use crate::clock::{self, Clock, SystemClock};
use crate::store::{Claim, Lease, Store};
use crate::{Error, Fingerprint, RecordKey};

/// A completed result kept in the cache.
struct Completed {
    fingerprint: Option<Fingerprint>,
    result: Arc<[u8]>,
    expires_at: i64,
}

/// The fingerprint a claim of this process was made with, until it completes or releases.
type Held = (RecordKey, String);

/// How often the cache answered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Claims answered from the cache (a replay or a mismatch) without the store.
    pub hits: u64,
    /// Claims that went to the store.
    pub misses: u64,
    /// Results put in the cache.
    pub inserted: u64,
}

/// A store with an in-process cache of the results this process completed: see the
/// [module](self).
pub struct CachedStore<S> {
    inner: S,
    clock: Arc<dyn Clock>,
    completed: Mutex<LruCache<RecordKey, Completed>>,
    held: Mutex<LruCache<Held, Option<Fingerprint>>>,
    max_result_bytes: usize,
    hits: AtomicU64,
    misses: AtomicU64,
    inserted: AtomicU64,
}

impl<S> fmt::Debug for CachedStore<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedStore")
            .field("stats", &self.stats())
            .field("max_result_bytes", &self.max_result_bytes)
            .finish_non_exhaustive()
    }
}

impl<S> CachedStore<S> {
    /// How often the cache answered so far.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            inserted: self.inserted.load(Ordering::Relaxed),
        }
    }
}

impl<S: Store> CachedStore<S> {
    /// The default limit on a cached result: 64 KiB.
    pub const DEFAULT_MAX_RESULT_BYTES: usize = 64 * 1024;

    /// Caches up to `capacity` completed results in front of `inner`, on the system clock.
    pub fn new(inner: S, capacity: NonZeroUsize) -> Self {
        Self {
            inner,
            clock: Arc::new(SystemClock),
            completed: Mutex::new(LruCache::new(capacity)),
            held: Mutex::new(LruCache::new(capacity)),
            max_result_bytes: Self::DEFAULT_MAX_RESULT_BYTES,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            inserted: AtomicU64::new(0),
        }
    }

    /// Reads time from `clock`: give it the clock the inner store uses.
    #[must_use]
    pub fn with_clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Leaves results longer than `bytes` to the store.
    #[must_use]
    pub fn with_max_result_bytes(mut self, bytes: usize) -> Self {
        self.max_result_bytes = bytes;
        self
    }

    /// The store behind the cache.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Empties the cache (the store keeps every record).
    pub fn clear(&self) {
        lock(&self.completed).clear();
    }

    /// The cache's answer for `key`, if it has a live result.
    fn cached(&self, key: &RecordKey, fingerprint: Option<&Fingerprint>) -> Option<Claim> {
        let mut completed = lock(&self.completed);
        let entry = completed.get(key)?;
        if entry.expires_at <= self.clock.now_millis() {
            completed.pop(key);
            return None;
        }
        Some(match (fingerprint, entry.fingerprint.as_ref()) {
            (Some(given), Some(stored)) if given != stored => Claim::Mismatch,
            _ => Claim::Completed(entry.result.to_vec()),
        })
    }
}

impl<S: Store> Store for CachedStore<S> {
    async fn claim(
        &self,
        key: &RecordKey,
        fingerprint: Option<&Fingerprint>,
        lease: Duration,
    ) -> Result<Claim, Error> {
        if let Some(answer) = self.cached(key, fingerprint) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(answer);
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let claim = self.inner.claim(key, fingerprint, lease).await?;
        if let Claim::Acquired(held) = &claim {
            lock(&self.held).put((key.clone(), held.owner().to_owned()), fingerprint.copied());
        }
        Ok(claim)
    }

    async fn complete(
        &self,
        key: &RecordKey,
        lease: &Lease,
        result: &[u8],
        ttl: Duration,
    ) -> Result<(), Error> {
        // Before the store reads its clock: the cached expiry is never later than the store's.
        let expires_at = clock::deadline(self.clock.now_millis(), ttl);
        let fingerprint = lock(&self.held).pop(&(key.clone(), lease.owner().to_owned()));
        self.inner.complete(key, lease, result, ttl).await?;
        // A claim this process did not make (or forgot) has an unknown fingerprint: caching it
        // could replay a reused key's result instead of refusing it, so it is not cached.
        if let Some(fingerprint) = fingerprint
            && result.len() <= self.max_result_bytes
        {
            lock(&self.completed).put(
                key.clone(),
                Completed {
                    fingerprint,
                    result: Arc::from(result),
                    expires_at,
                },
            );
            self.inserted.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    async fn release(&self, key: &RecordKey, lease: &Lease) -> Result<(), Error> {
        lock(&self.held).pop(&(key.clone(), lease.owner().to_owned()));
        self.inner.release(key, lease).await
    }

    async fn extend(
        &self,
        key: &RecordKey,
        lease: &Lease,
        duration: Duration,
    ) -> Result<Lease, Error> {
        self.inner.extend(key, lease, duration).await
    }

    async fn purge_expired(&self, limit: u32) -> Result<u64, Error> {
        self.inner.purge_expired(limit).await
    }
}

/// The map, also after a panic elsewhere: every update leaves it consistent.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::MemoryStore;
    use crate::clock::ManualClock;

    const TTL: Duration = Duration::from_secs(60);
    const LEASE: Duration = Duration::from_secs(5);

    /// A memory store that counts the claims that reach it.
    struct Counted {
        inner: MemoryStore,
        claims: AtomicUsize,
    }

    impl Store for Counted {
        async fn claim(
            &self,
            key: &RecordKey,
            fingerprint: Option<&Fingerprint>,
            lease: Duration,
        ) -> Result<Claim, Error> {
            self.claims.fetch_add(1, Ordering::SeqCst);
            self.inner.claim(key, fingerprint, lease).await
        }

        async fn complete(
            &self,
            key: &RecordKey,
            lease: &Lease,
            result: &[u8],
            ttl: Duration,
        ) -> Result<(), Error> {
            self.inner.complete(key, lease, result, ttl).await
        }

        async fn release(&self, key: &RecordKey, lease: &Lease) -> Result<(), Error> {
            self.inner.release(key, lease).await
        }

        async fn extend(
            &self,
            key: &RecordKey,
            lease: &Lease,
            duration: Duration,
        ) -> Result<Lease, Error> {
            self.inner.extend(key, lease, duration).await
        }

        async fn purge_expired(&self, limit: u32) -> Result<u64, Error> {
            self.inner.purge_expired(limit).await
        }
    }

    fn cached(capacity: usize) -> (CachedStore<Counted>, ManualClock) {
        let clock = ManualClock::new(1_700_000_000_000);
        let inner = Counted {
            inner: MemoryStore::with_clock(clock.clone()),
            claims: AtomicUsize::new(0),
        };
        let capacity = NonZeroUsize::new(capacity).expect("capacity above 0");
        (
            CachedStore::new(inner, capacity).with_clock(clock.clone()),
            clock,
        )
    }

    fn key(name: &str) -> RecordKey {
        RecordKey::new("cache.tests", name).expect("key")
    }

    fn reached(store: &CachedStore<Counted>) -> usize {
        store.inner().claims.load(Ordering::SeqCst)
    }

    async fn complete(
        store: &CachedStore<Counted>,
        name: &str,
        fp: Option<&Fingerprint>,
        result: &[u8],
    ) {
        let Claim::Acquired(lease) = store.claim(&key(name), fp, LEASE).await.expect("claim")
        else {
            panic!("a new key is acquired");
        };
        store
            .complete(&key(name), &lease, result, TTL)
            .await
            .expect("complete");
    }

    #[tokio::test]
    async fn replays_of_a_completed_key_skip_the_store() {
        let (store, _) = cached(8);
        complete(&store, "a", None, b"42").await;
        assert_eq!(reached(&store), 1);
        for _ in 0..3 {
            let replay = store.claim(&key("a"), None, LEASE).await.expect("replay");
            assert_eq!(replay, Claim::Completed(b"42".to_vec()));
        }
        assert_eq!(reached(&store), 1, "the replays came from the cache");
        assert_eq!(
            store.stats(),
            CacheStats {
                hits: 3,
                misses: 1,
                inserted: 1
            }
        );
    }

    #[tokio::test]
    async fn in_progress_keys_always_ask_the_store() {
        let (store, _) = cached(8);
        let Claim::Acquired(_) = store.claim(&key("a"), None, LEASE).await.expect("claim") else {
            panic!("acquired");
        };
        for n in 2..5 {
            let busy = store.claim(&key("a"), None, LEASE).await.expect("claim");
            assert!(matches!(busy, Claim::InProgress { .. }), "{busy:?}");
            assert_eq!(reached(&store), n);
        }
    }

    #[tokio::test]
    async fn an_expired_result_is_not_served() {
        let (store, clock) = cached(8);
        complete(&store, "a", None, b"1").await;
        clock.advance(TTL - Duration::from_millis(1));
        assert_eq!(
            store.claim(&key("a"), None, LEASE).await.expect("claim"),
            Claim::Completed(b"1".to_vec())
        );
        assert_eq!(reached(&store), 1);
        clock.advance(Duration::from_millis(1));
        let again = store.claim(&key("a"), None, LEASE).await.expect("claim");
        assert!(matches!(again, Claim::Acquired(_)), "{again:?}");
        assert_eq!(reached(&store), 2, "the expired result went to the store");
    }

    #[tokio::test]
    async fn another_payload_is_a_mismatch_from_the_cache_too() {
        let (store, _) = cached(8);
        let first = Fingerprint::of(&"payload one").expect("fingerprint");
        let second = Fingerprint::of(&"payload two").expect("fingerprint");
        complete(&store, "a", Some(&first), b"1").await;
        assert_eq!(
            store
                .claim(&key("a"), Some(&second), LEASE)
                .await
                .expect("claim"),
            Claim::Mismatch
        );
        assert_eq!(
            store
                .claim(&key("a"), Some(&first), LEASE)
                .await
                .expect("claim"),
            Claim::Completed(b"1".to_vec())
        );
        assert_eq!(
            store.claim(&key("a"), None, LEASE).await.expect("claim"),
            Claim::Completed(b"1".to_vec()),
            "no fingerprint skips the check, as in the stores"
        );
        assert_eq!(reached(&store), 1);
    }

    #[tokio::test]
    async fn the_least_recently_used_result_leaves_first() {
        let (store, _) = cached(2);
        complete(&store, "a", None, b"a").await;
        complete(&store, "b", None, b"b").await;
        store
            .claim(&key("a"), None, LEASE)
            .await
            .expect("a, from the cache");
        complete(&store, "c", None, b"c").await; // `b` leaves
        assert_eq!(reached(&store), 3);
        store.claim(&key("a"), None, LEASE).await.expect("a");
        store.claim(&key("c"), None, LEASE).await.expect("c");
        assert_eq!(reached(&store), 3);
        assert_eq!(
            store
                .claim(&key("b"), None, LEASE)
                .await
                .expect("b, from the store"),
            Claim::Completed(b"b".to_vec())
        );
        assert_eq!(reached(&store), 4);
    }

    #[tokio::test]
    async fn large_results_and_others_completions_are_left_to_the_store() {
        let (store, _) = cached(8);
        let store = store.with_max_result_bytes(4);
        complete(&store, "big", None, b"12345").await;
        assert_eq!(
            store.claim(&key("big"), None, LEASE).await.expect("claim"),
            Claim::Completed(b"12345".to_vec())
        );
        assert_eq!(reached(&store), 2, "a result over the limit is not cached");

        // Completed through the store directly (another process): not cached either.
        let Claim::Acquired(lease) = store
            .inner()
            .claim(&key("other"), None, LEASE)
            .await
            .expect("claim")
        else {
            panic!("acquired");
        };
        store
            .inner()
            .complete(&key("other"), &lease, b"1", TTL)
            .await
            .expect("complete");
        store
            .claim(&key("other"), None, LEASE)
            .await
            .expect("claim");
        store
            .claim(&key("other"), None, LEASE)
            .await
            .expect("claim");
        assert_eq!(reached(&store), 5);
        assert_eq!(store.stats().inserted, 0);
    }

    #[tokio::test]
    async fn a_stale_holders_completion_is_refused_and_not_cached() {
        let (store, clock) = cached(8);
        let Claim::Acquired(stale) = store.claim(&key("a"), None, LEASE).await.expect("claim")
        else {
            panic!("acquired");
        };
        clock.advance(LEASE);
        let Claim::Acquired(fresh) = store.claim(&key("a"), None, LEASE).await.expect("claim")
        else {
            panic!("taken over");
        };
        let refused = store.complete(&key("a"), &stale, b"stale", TTL).await;
        assert!(
            matches!(refused, Err(Error::LeaseLost { .. })),
            "{refused:?}"
        );
        assert_eq!(store.stats().inserted, 0);
        store
            .complete(&key("a"), &fresh, b"fresh", TTL)
            .await
            .expect("complete");
        assert_eq!(
            store.claim(&key("a"), None, LEASE).await.expect("claim"),
            Claim::Completed(b"fresh".to_vec())
        );
    }

    #[tokio::test]
    async fn a_released_key_runs_again() {
        let (store, _) = cached(8);
        let Claim::Acquired(lease) = store.claim(&key("a"), None, LEASE).await.expect("claim")
        else {
            panic!("acquired");
        };
        store.release(&key("a"), &lease).await.expect("release");
        let again = store.claim(&key("a"), None, LEASE).await.expect("claim");
        assert!(matches!(again, Claim::Acquired(_)), "{again:?}");
    }
}
