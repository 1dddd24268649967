//! The claim/complete protocol every store implements.
//!
//! A record lives under a [`RecordKey`] and is in one of two states:
//!
//! * **in progress** — a call holds it under a lease: an owner token and a fencing number
//!   ([`Lease`]). While the lease runs, other calls get [`Claim::InProgress`]. When it runs out
//!   (the holder crashed or is too slow) the next claim takes the record over and the fence
//!   rises, so the old holder can no longer complete, release or extend it
//!   ([`Error::LeaseLost`]).
//! * **completed** — the serialized result is kept until the record expires; claims get
//!   [`Claim::Completed`] with it.
//!
//! A released record (the body failed) and an expired record can be claimed again at once.
//! Expired records are deleted by [`Store::purge_expired`] in bounded batches.

pub mod cache;
pub(crate) mod memory;
#[cfg(feature = "redis")]
pub mod redis;
pub(crate) mod sweeper;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::{Error, Fingerprint, RecordKey};

/// A held claim: who holds it and with which fencing number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    owner: String,
    fence: u64,
    until_millis: i64,
}

impl Lease {
    /// A lease as a store hands it out.
    pub fn new(owner: String, fence: u64, until_millis: i64) -> Self {
        Self {
            owner,
            fence,
            until_millis,
        }
    }

    /// The owner token: unique per claim.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The fencing number: it rises with every claim and takeover of the same record, so
    /// while the record exists a larger fence belongs to a later holder. A record that was
    /// purged (or expired from Redis) starts again at 1; a holder of the old record still gets
    /// [`Error::LeaseLost`], because its owner token no longer matches.
    pub fn fence(&self) -> u64 {
        self.fence
    }

    /// When the lease runs out, in milliseconds since the Unix epoch by the store's clock.
    pub fn until_millis(&self) -> i64 {
        self.until_millis
    }
}

/// What a claim found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The caller now holds the key and must complete or release it.
    Acquired(Lease),
    /// The key was completed before: here is the stored result.
    Completed(Vec<u8>),
    /// Another call holds the key; its lease runs for `retry_after` more.
    InProgress {
        /// How long the current lease still runs.
        retry_after: Duration,
    },
    /// The key is held or completed with another payload's fingerprint.
    Mismatch,
}

/// A store for the claim/complete protocol.
///
/// Every method is atomic in the store; `complete`, `release` and `extend` change the record
/// only if `lease` is still the current holder's (same owner and fence) and otherwise return
/// [`Error::LeaseLost`] without changing anything.
///
/// The conformance suite in `idem_runtime::testing` (feature `testing`) checks an
/// implementation against this contract.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an idem store",
    label = "the `store` option must give a value implementing `idem_runtime::Store`",
    note = "use one of idem's stores (`MemoryStore`, `SqliteStore`, `PostgresStore`, `MySqlStore`, \
            `RedisStore`), or a reference, `Arc` or `Box` of one"
)]
pub trait Store: Send + Sync {
    /// Claims `key` for a lease of `lease`, or reports what holds it.
    ///
    /// A new key, a released key and an expired record are acquired. `fingerprint`, when both
    /// it and the stored one are present, must match for the stored record to be reported as
    /// in progress or completed; otherwise the answer is [`Claim::Mismatch`].
    fn claim(
        &self,
        key: &RecordKey,
        fingerprint: Option<&Fingerprint>,
        lease: Duration,
    ) -> impl Future<Output = Result<Claim, Error>> + Send;

    /// Records `result` for the held `lease` and keeps it for `ttl`.
    fn complete(
        &self,
        key: &RecordKey,
        lease: &Lease,
        result: &[u8],
        ttl: Duration,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// Gives the key up so the next claim runs at once (the body failed).
    fn release(
        &self,
        key: &RecordKey,
        lease: &Lease,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// Extends the held lease to run `lease` from now (a heartbeat), returning the new lease.
    fn extend(
        &self,
        key: &RecordKey,
        lease: &Lease,
        duration: Duration,
    ) -> impl Future<Output = Result<Lease, Error>> + Send;

    /// Deletes up to `limit` records whose expiry has passed and returns how many it deleted.
    fn purge_expired(&self, limit: u32) -> impl Future<Output = Result<u64, Error>> + Send;
}

macro_rules! forward_store {
    ($($ptr:ty),*) => {$(
        impl<S: Store + ?Sized> Store for $ptr {
            fn claim(
                &self,
                key: &RecordKey,
                fingerprint: Option<&Fingerprint>,
                lease: Duration,
            ) -> impl Future<Output = Result<Claim, Error>> + Send {
                (**self).claim(key, fingerprint, lease)
            }

            fn complete(
                &self,
                key: &RecordKey,
                lease: &Lease,
                result: &[u8],
                ttl: Duration,
            ) -> impl Future<Output = Result<(), Error>> + Send {
                (**self).complete(key, lease, result, ttl)
            }

            fn release(
                &self,
                key: &RecordKey,
                lease: &Lease,
            ) -> impl Future<Output = Result<(), Error>> + Send {
                (**self).release(key, lease)
            }

            fn extend(
                &self,
                key: &RecordKey,
                lease: &Lease,
                duration: Duration,
            ) -> impl Future<Output = Result<Lease, Error>> + Send {
                (**self).extend(key, lease, duration)
            }

            fn purge_expired(&self, limit: u32) -> impl Future<Output = Result<u64, Error>> + Send {
                (**self).purge_expired(limit)
            }
        }
    )*};
}

forward_store!(&S, Arc<S>, Box<S>);

/// A fresh owner token.
pub(crate) fn new_owner() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The [`Error::LeaseLost`] for `lease` on `key`.
pub(crate) fn lease_lost(key: &RecordKey, lease: &Lease) -> Error {
    Error::LeaseLost {
        scope: key.scope().to_owned(),
        key: key.key().to_owned(),
        fence: lease.fence(),
    }
}
