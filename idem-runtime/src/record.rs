//! What the SQL stores share: reading back a record that a claim did not take, and the errors
//! for stored values that do not decode.

use crate::clock;
use crate::store::{Claim, Lease, lease_lost};
use crate::{Error, Fingerprint, RecordKey};

/// How many times a claim is retried when the record it found vanished or expired between
/// the claim statement and the read that follows it.
pub(crate) const CLAIM_ATTEMPTS: usize = 8;

/// A record as a SQL store reads it when its claim statement changed nothing.
pub(crate) struct Found {
    /// Completed (`true`) or in progress.
    pub(crate) completed: bool,
    /// When the lease of an in-progress record runs out.
    pub(crate) lease_until: i64,
    /// When the record expires.
    pub(crate) expires_at: i64,
    /// The stored fingerprint, if any.
    pub(crate) fingerprint: Option<Vec<u8>>,
    /// The stored result, if any.
    pub(crate) result: Option<Vec<u8>>,
}

impl Found {
    /// What the claim of `key` with `fingerprint` at `now` reports for this record, or `None`
    /// when the record is free by now (it expired since the claim statement): claim again.
    pub(crate) fn answer(
        self,
        key: &RecordKey,
        now: i64,
        fingerprint: Option<&Fingerprint>,
    ) -> Result<Option<Claim>, Error> {
        let live_until = if self.completed {
            self.expires_at
        } else {
            self.lease_until
        };
        if live_until <= now {
            return Ok(None);
        }
        if let (Some(stored), Some(given)) = (self.fingerprint, fingerprint) {
            let stored = <[u8; 32]>::try_from(stored.as_slice()).map_err(|_| {
                decode_error(key, format!("`fingerprint` has {} bytes", stored.len()))
            })?;
            if Fingerprint::from_bytes(stored) != *given {
                return Ok(Some(Claim::Mismatch));
            }
        }
        if self.completed {
            let result = self
                .result
                .ok_or_else(|| decode_error(key, "a completed record has no result"))?;
            Ok(Some(Claim::Completed(result)))
        } else {
            Ok(Some(Claim::InProgress {
                retry_after: clock::remaining(now, self.lease_until),
            }))
        }
    }
}

/// [`Error::Decode`] for `key`: a stored value that does not decode, and why.
pub(crate) fn decode_error(key: &RecordKey, reason: impl Into<crate::BoxError>) -> Error {
    Error::Decode {
        scope: key.scope().to_owned(),
        key: key.key().to_owned(),
        source: reason.into(),
    }
}

/// A stored fence, which must be positive.
pub(crate) fn stored_fence(key: &RecordKey, fence: i64) -> Result<u64, Error> {
    match u64::try_from(fence) {
        Ok(fence) if fence > 0 => Ok(fence),
        _ => Err(decode_error(key, format!("`fence` is {fence}"))),
    }
}

/// The fence of `lease` as a SQL integer; a fence no record can hold means the lease is lost.
pub(crate) fn fence_param(key: &RecordKey, lease: &Lease) -> Result<i64, Error> {
    i64::try_from(lease.fence()).map_err(|_| lease_lost(key, lease))
}
