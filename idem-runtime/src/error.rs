//! The one error type of idem.

use std::time::Duration;

/// A boxed error from a store's driver or from a decoder.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in an idempotent call.
///
/// A handler's own error type must implement `From<idem_runtime::Error>`: the generated
/// wrapper returns these errors through it. Match on the variants to decide what to do with a
/// message: [`Error::InProgress`] means "do not ack, redeliver later"; the others are final for
/// this delivery.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Another call holds the key and has not finished. Do not acknowledge the message:
    /// retry after `retry_after` (or let the broker redeliver it).
    #[error("key `{key}` of `{scope}` is being handled by another call; retry in {retry_after:?}")]
    InProgress {
        /// The handler scope.
        scope: String,
        /// The business key (hashed if it was long).
        key: String,
        /// How long the current holder's lease still runs.
        retry_after: Duration,
    },

    /// The key was already used with a different payload: this is not a duplicate but a
    /// reused key, and replaying the stored result would be wrong.
    ///
    /// When the message is a redelivery of the same one, the usual cause is delivery metadata
    /// in the fingerprinted payload (a broker message id, a delivery count, a send timestamp):
    /// it differs between a message and its resend. Keep it out of the fingerprint with
    /// `#[serde(skip_serializing)]` on the field (it is still decoded) or with
    /// `fingerprint = (msg.amount, msg.currency)`.
    #[error(
        "key `{key}` of `{scope}` was already used with a different payload; if this is a redelivery, delivery metadata in the payload (a message id, a delivery count, a timestamp) is the usual cause: keep it out of the fingerprint with `#[serde(skip_serializing)]` or `fingerprint = (…)`"
    )]
    FingerprintMismatch {
        /// The handler scope.
        scope: String,
        /// The business key (hashed if it was long).
        key: String,
    },

    /// The business key is empty or only whitespace, or a part of a composite key is.
    #[error("the idempotency key for `{scope}` is empty (or a part of it is)")]
    EmptyKey {
        /// The handler scope.
        scope: String,
    },

    /// The scope is empty.
    #[error("the idempotency scope is empty")]
    EmptyScope,

    /// A table or key-prefix name given to a store is not a plain identifier. Names are
    /// checked when the store is built and never pasted into a statement unchecked.
    #[error("invalid {what} `{name}`: {reason}")]
    InvalidName {
        /// What the name is for, such as "table name".
        what: &'static str,
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// An upsert (`unique::Upsert`) cannot run as it was built: it names no key column, or
    /// names a column twice. Nothing was sent to the database.
    #[error("the upsert into `{table}` cannot run: {reason}")]
    InvalidUpsert {
        /// The table.
        table: String,
        /// What is wrong with it.
        reason: String,
    },

    /// This call's claim was taken over (its lease expired and another call claimed the key) or
    /// the record was purged. Nothing was changed: the other holder's result stands.
    #[error("lease on key `{key}` of `{scope}` was lost (fence {fence}); nothing was recorded")]
    LeaseLost {
        /// The handler scope.
        scope: String,
        /// The business key (hashed if it was long).
        key: String,
        /// The fencing number this call held.
        fence: u64,
    },

    /// The store could not be reached or failed. The handler body did not run if this happened
    /// while claiming.
    #[error("idempotency store error: {0}")]
    Store(#[from] StoreError),

    /// A stored record (its result or one of its fields) can no longer be decoded, for example
    /// because the handler's result type changed or the row was edited by hand.
    #[error("stored record for key `{key}` of `{scope}` does not decode: {source}")]
    Decode {
        /// The handler scope.
        scope: String,
        /// The business key (hashed if it was long).
        key: String,
        /// Why it does not decode.
        #[source]
        source: BoxError,
    },

    /// A guarded state transition or a versioned update found no row with the id
    /// (`strategy = "state"` or `"version"`).
    #[error("no row of `{table}` has the id {id}")]
    RowMissing {
        /// The table.
        table: &'static str,
        /// The id, as it was bound.
        id: String,
    },

    /// A guarded state transition found the row in a state that neither is the transition's
    /// `from` nor follows its `to`: the message does not fit the row (`strategy = "state"`).
    #[error("cannot go from `{from}` to `{to}`: the row is at `{current}`")]
    InvalidTransition {
        /// The row's state.
        current: &'static str,
        /// The state the transition starts from.
        from: &'static str,
        /// The state the transition goes to.
        to: &'static str,
    },

    /// A versioned update found the row past the version the message expected, and the
    /// handler treats that as a conflict (`stale = "conflict"`): the row changed since the
    /// message was written, which must be recomputed from the row as it is now.
    #[error(
        "row {id} of `{table}` is at version {current}, past the expected {expected}: it changed since the message was written"
    )]
    StaleVersion {
        /// The table.
        table: &'static str,
        /// The id, as it was bound.
        id: String,
        /// The version the message expected.
        expected: i64,
        /// The row's version.
        current: i64,
    },

    /// A versioned update found the row behind the version the message expected: a change the
    /// message builds on has not been applied yet (messages overtook each other). Do not
    /// acknowledge the message: redeliver it later.
    #[error(
        "row {id} of `{table}` is at version {current}, behind the expected {expected}: an earlier change has not arrived yet; redeliver later"
    )]
    VersionAhead {
        /// The table.
        table: &'static str,
        /// The id, as it was bound.
        id: String,
        /// The version the message expected.
        expected: i64,
        /// The row's version.
        current: i64,
    },

    /// A value could not be serialized (the result to store, or the payload to fingerprint),
    /// or the result does not deserialize from what it serialized to.
    ///
    /// A result that deserializes to *another* value is not an error: `Some(None)` as
    /// `Option<Option<_>>` comes back `None`, `Some(())` as `Option<()>` too, a
    /// `#[serde(skip)]` field as its default. The call returns the value as it came back, to
    /// the first caller as to every replay.
    ///
    /// For a result this is raised after the body ran: its effect happened but cannot be
    /// recorded, so the claim is not released; it expires with its lease, and a delivery after
    /// that runs the body again. Fix the result type (check it with a round trip in a test).
    #[error("could not serialize the {what}: {source}")]
    Encode {
        /// What was being serialized.
        what: &'static str,
        /// The serializer's error.
        #[source]
        source: serde_json::Error,
    },
}

/// A failure of the store itself: connection, query or driver error.
#[derive(Debug, thiserror::Error)]
#[error("{backend}: {source}")]
pub struct StoreError {
    backend: &'static str,
    #[source]
    source: BoxError,
}

impl StoreError {
    /// Wraps a driver error of the store named `backend`.
    pub fn new(backend: &'static str, source: impl Into<BoxError>) -> Self {
        Self {
            backend,
            source: source.into(),
        }
    }

    /// The name of the store that failed, such as `"sqlite"`.
    pub fn backend(&self) -> &'static str {
        self.backend
    }
}
