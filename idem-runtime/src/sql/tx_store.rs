//! The protocol of a store whose records can be written in the caller's own transaction: the
//! SQL stores. The `tx` strategy (`crate::tx`) is built on it.

use std::future::Future;
use std::time::Duration;

use crate::{Error, Fingerprint, Lease, RecordKey, Store};

/// What a claim inside a transaction found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxClaim {
    /// The key is claimed in this transaction: run the body on it, then
    /// [`complete_in`](TxStore::complete_in) (or [`abandon_in`](TxStore::abandon_in) if the
    /// body failed).
    Run(TxLease),
    /// The key was completed and committed before: the stored result. Nothing was written.
    Completed(Vec<u8>),
}

/// A claim held in a transaction: its lease and the savepoint set before it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxLease {
    lease: Lease,
    savepoint: String,
}

impl TxLease {
    /// A claim under `lease`, made after the savepoint `savepoint` (a plain identifier).
    pub fn new(lease: Lease, savepoint: String) -> Self {
        Self { lease, savepoint }
    }

    /// The lease of the claim.
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// The savepoint set before the claim: unique per claim, so that handlers nested in one
    /// transaction each undo only their own work.
    pub fn savepoint(&self) -> &str {
        &self.savepoint
    }
}

/// A store whose records can be written in the caller's own database transaction: the SQL
/// stores.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot keep records in your transaction",
    label = "`strategy = \"tx\"` needs a SQL store here",
    note = "use the `SqliteStore`, `PostgresStore` or `MySqlStore` of the database your transaction \
            is on (or a reference or `Arc` of one)"
)]
pub trait TxStore: Store {
    /// The database the store is in.
    type Database: sqlx::Database;

    /// Begins a transaction on the store's pool, for [`claim_in`](Self::claim_in) and the
    /// body's writes.
    ///
    /// # Errors
    ///
    /// [`Error::Store`] if no connection can be had or `BEGIN` fails.
    fn begin(
        &self,
    ) -> impl Future<Output = Result<sqlx::Transaction<'static, Self::Database>, Error>> + Send;

    /// Sets a savepoint of its own in `tx` and claims `key` there (see the [module](crate::tx)).
    ///
    /// # Errors
    ///
    /// [`Error::FingerprintMismatch`] for a key used with another payload,
    /// [`Error::InProgress`] for a key another call holds under the `claim` strategy,
    /// [`Error::Store`] and [`Error::Decode`] as for [`Store::claim`]. The savepoint is undone
    /// when the claim does not acquire the key; if even that fails (MySQL rolls the whole
    /// transaction back on a deadlock), the error says so: roll the transaction back.
    fn claim_in(
        &self,
        tx: &mut sqlx::Transaction<'_, Self::Database>,
        key: &RecordKey,
        fingerprint: Option<&Fingerprint>,
        lease: Duration,
    ) -> impl Future<Output = Result<TxClaim, Error>> + Send;

    /// [`claim_in`](Self::claim_in), waiting at most `wait` for another transaction that
    /// holds the record's row lock (a copy of this call that has not committed): after that
    /// the claim gives up with [`Error::InProgress`] instead of holding its connection until
    /// the other commits. PostgreSQL bounds the wait to the millisecond (`lock_timeout`, local
    /// to the transaction), MySQL / MariaDB to whole seconds (`innodb_lock_wait_timeout`); the
    /// value in force before is put back after the claim, so the body's statements wait as
    /// they would have. On MySQL the setting belongs to the session, which outlives the
    /// transaction: a call cancelled between the two (its future dropped) leaves the bound on
    /// the connection. On SQLite, where a writer waits for any other writer, the pool's busy
    /// timeout applies and its expiry is [`Error::Store`].
    ///
    /// # Errors
    ///
    /// As for [`claim_in`](Self::claim_in).
    fn claim_in_within(
        &self,
        tx: &mut sqlx::Transaction<'_, Self::Database>,
        key: &RecordKey,
        fingerprint: Option<&Fingerprint>,
        lease: Duration,
        wait: Duration,
    ) -> impl Future<Output = Result<TxClaim, Error>> + Send;

    /// Records `result` for `claim` in the transaction, kept for `ttl` once it is committed,
    /// and releases the claim's savepoint.
    ///
    /// # Errors
    ///
    /// [`Error::LeaseLost`] if the record is not this claim's, [`Error::Store`] if a
    /// statement fails.
    fn complete_in(
        &self,
        tx: &mut sqlx::Transaction<'_, Self::Database>,
        key: &RecordKey,
        claim: &TxLease,
        result: &[u8],
        ttl: Duration,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// Rolls the transaction back to the savepoint of `claim`: the claim and everything
    /// written since are undone.
    ///
    /// # Errors
    ///
    /// [`Error::Store`] if that fails: then roll the whole transaction back, because it still
    /// holds the claim and the body's writes.
    fn abandon_in(
        &self,
        tx: &mut sqlx::Transaction<'_, Self::Database>,
        claim: &TxLease,
    ) -> impl Future<Output = Result<(), Error>> + Send;
}

macro_rules! forward_tx_store {
    ($($ptr:ty),*) => {$(
        impl<S: TxStore + ?Sized> TxStore for $ptr {
            type Database = S::Database;

            fn begin(
                &self,
            ) -> impl Future<Output = Result<sqlx::Transaction<'static, Self::Database>, Error>> + Send {
                (**self).begin()
            }

            fn claim_in(
                &self,
                tx: &mut sqlx::Transaction<'_, Self::Database>,
                key: &RecordKey,
                fingerprint: Option<&Fingerprint>,
                lease: Duration,
            ) -> impl Future<Output = Result<TxClaim, Error>> + Send {
                (**self).claim_in(tx, key, fingerprint, lease)
            }

            fn claim_in_within(
                &self,
                tx: &mut sqlx::Transaction<'_, Self::Database>,
                key: &RecordKey,
                fingerprint: Option<&Fingerprint>,
                lease: Duration,
                wait: Duration,
            ) -> impl Future<Output = Result<TxClaim, Error>> + Send {
                (**self).claim_in_within(tx, key, fingerprint, lease, wait)
            }

            fn complete_in(
                &self,
                tx: &mut sqlx::Transaction<'_, Self::Database>,
                key: &RecordKey,
                claim: &TxLease,
                result: &[u8],
                ttl: Duration,
            ) -> impl Future<Output = Result<(), Error>> + Send {
                (**self).complete_in(tx, key, claim, result, ttl)
            }

            fn abandon_in(
                &self,
                tx: &mut sqlx::Transaction<'_, Self::Database>,
                claim: &TxLease,
            ) -> impl Future<Output = Result<(), Error>> + Send {
                (**self).abandon_in(tx, claim)
            }
        }
    )*};
}

forward_tx_store!(&S, std::sync::Arc<S>, Box<S>);
